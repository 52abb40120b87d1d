"""Build the GPU kit folder (default ``.gpu-kit/``, git-ignored) from ``lock.txt``: everything a GPU machine
without network needs, besides its own image, to run both real stages with random weights (README.md).

    python3 benchmarks/gpu_kit/build.py                       # trees from a local git dir if found, else GitHub
    python3 benchmarks/gpu_kit/build.py --mirror /work/.mirror  # trees only from local git dirs
    python3 benchmarks/gpu_kit/build.py --clone               # trees only from GitHub (git clone of one commit)
    python3 benchmarks/gpu_kit/build.py --relock              # after a version change in lock.txt: new sha256s

What it writes (≤ 64 MiB, checked)::

    .gpu-kit/wheels/        the locked wheels, each checked against its sha256 (+ wheels built from locked sdists)
    .gpu-kit/site/          sam3d_objects, moge, utils3d, pytorch3d's pure-PyTorch parts at their commits, plus
                            the shims (shims/: pytorch3d renderer/structures stand-ins, import stubs, a local
                            DINOv2 hub, a sitecustomize that records each process's CUDA peak memory)
    .gpu-kit/checkpoints/   the SAM 3D Objects checkpoint configs (no weights: random-weight runs only)
    .gpu-kit/kit.json       the lock's sha256, every file's size and the source of each tree

Only the standard library, git and pip are needed here. Wheels are cached in ``--cache`` (default
``~/.cache/gpu-kit``), so a rebuild needs no network for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOCK = HERE / "lock.txt"
SHIMS = HERE / "shims"
LIMIT_BYTES = 64 * 2**20  # what one device call carries, the repository's own files included
REPO_ALLOWANCE = 8 * 2**20  # left for the working tree that travels with the kit
PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                 "--abi", "none", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64", "--platform", "any"]
#: shim → where it goes in the kit (relative to the kit folder)
SHIM_LAYOUT = {
    "pytorch3d_renderer": "site/pytorch3d/renderer",
    "pytorch3d_structures": "site/pytorch3d/structures",
    "dinov2_hub": "site/dinov2_hub",
    "sitecustomize.py": "site/sitecustomize.py",
}
SHIM_STUBS = "stubs"  # each package inside goes to site/ as is


@dataclass
class Package:
    kind: str  # wheel | sdist
    name: str
    version: str
    sha256: str
    file: str
    line: int


@dataclass
class Tree:
    repo: str
    commit: str
    dest: str
    paths: list[str]
    strip: int = 0
    line: int = 0


@dataclass
class Lock:
    packages: list[Package] = field(default_factory=list)
    trees: list[Tree] = field(default_factory=list)


def parse_lock(text: str) -> Lock:
    """The lock's entries; a malformed line is a SystemExit naming it."""
    lock = Lock()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0] in ("wheel", "sdist"):
            if len(parts) != 5:
                raise SystemExit(f"lock.txt:{n}: expected '{parts[0]} NAME VERSION SHA256 FILE', got {raw!r}")
            lock.packages.append(Package(parts[0], parts[1], parts[2], parts[3], parts[4], n))
        elif parts[0] == "tree":
            if len(parts) < 5:
                raise SystemExit(f"lock.txt:{n}: expected 'tree OWNER/REPO COMMIT DEST [strip=N] PATH...', got {raw!r}")
            repo, commit, dest, rest = parts[1], parts[2], parts[3], parts[4:]
            strip = 0
            if rest[0].startswith("strip="):
                strip, rest = int(rest[0][6:]), rest[1:]
            if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
                raise SystemExit(f"lock.txt:{n}: the commit of {repo} must be 40 lower-case hex digits, got {commit!r}")
            if not rest:
                raise SystemExit(f"lock.txt:{n}: tree {repo} names no path")
            lock.trees.append(Tree(repo, commit, dest, rest, strip, n))
        else:
            raise SystemExit(f"lock.txt:{n}: unknown entry {parts[0]!r} (wheel, sdist or tree)")
    return lock


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(argv[:6])} ...` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


# ---------------------------------------------------------------------------------------------- packages


def _download(pkg: Package, into: Path) -> Path:
    """``pkg``'s file in ``into`` (downloaded with pip unless it is there already)."""
    into.mkdir(parents=True, exist_ok=True)
    if pkg.file != "-" and (into / pkg.file).is_file():
        return into / pkg.file
    before = set(into.iterdir())
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(into)]
    if pkg.kind == "wheel":
        argv += ["--only-binary=:all:", *PLATFORM_ARGS]
    else:
        argv += ["--no-binary=:all:"]
    run(argv + [f"{pkg.name}=={pkg.version}"])
    if pkg.file != "-" and (into / pkg.file).is_file():
        return into / pkg.file
    new = [p for p in into.iterdir() if p not in before]
    if len(new) == 1:
        return new[0]
    norm = pkg.name.replace("-", "_").lower()
    hits = [p for p in into.iterdir() if p.name.replace("-", "_").lower().startswith(f"{norm}-{pkg.version}")]
    if len(hits) != 1:
        raise SystemExit(f"lock.txt:{pkg.line}: cannot tell which file pip saved for {pkg.name}=={pkg.version}: {hits}")
    return hits[0]


def _wheel_of_sdist(sdist: Path, into: Path) -> Path:
    """A py3-none-any wheel built from a pure-Python sdist (setuptools of this interpreter, else isolated)."""
    into.mkdir(parents=True, exist_ok=True)
    stem = sdist.name.removesuffix(".tar.gz").removesuffix(".zip")
    name, _, version = stem.rpartition("-")
    prefix = f"{name.replace('-', '_').lower()}-{version}-"
    for old in into.iterdir():
        if old.name.lower().startswith(prefix) and old.suffix == ".whl":
            return old
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(into)]
    proc = subprocess.run(base + ["--no-build-isolation", str(sdist)], capture_output=True, text=True)
    if proc.returncode != 0:
        run(base + [str(sdist)])
    built = [p for p in into.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl"]
    if len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
        raise SystemExit(f"building a wheel of {sdist.name} gave {built} (expected one pure-Python wheel)")
    return built[0]


def fetch_packages(lock: Lock, cache: Path, wheels: Path, *, relock: bool) -> dict[str, dict]:
    """Download (or take from the cache), check and copy every package into ``wheels``; returns a report."""
    report: dict[str, dict] = {}
    for pkg in lock.packages:
        path = _download(pkg, cache / "downloads")
        digest = sha256_of(path)
        if relock:
            pkg.sha256, pkg.file = digest, path.name
        elif pkg.sha256 == "-":
            raise SystemExit(f"lock.txt:{pkg.line}: {pkg.name} has no sha256 yet: run build.py --relock")
        elif digest != pkg.sha256 or path.name != pkg.file:
            raise SystemExit(f"lock.txt:{pkg.line}: {path.name} has sha256 {digest}, the lock says {pkg.file} {pkg.sha256}")
        if pkg.kind == "sdist":
            wheel = _wheel_of_sdist(path, cache / "built")
        else:
            wheel = path
        shutil.copy2(wheel, wheels / wheel.name)
        report[pkg.name] = {"version": pkg.version, "kind": pkg.kind, "file": path.name, "sha256": digest,
                            "carried": wheel.name, "carried_sha256": sha256_of(wheel)}
    return report


def write_relocked(lock: Lock, path: Path) -> None:
    """Rewrite the lock's package lines with the sha256 and file names just downloaded (comments kept)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for pkg in lock.packages:
        lines[pkg.line - 1] = f"{pkg.kind} {pkg.name} {pkg.version} {pkg.sha256} {pkg.file}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- trees


def local_git_dir(repo: str, mirrors: list[Path]) -> Path | None:
    """A git dir for ``owner/name`` under one of ``mirrors`` (the fetch tool's ``owner+name/repo`` layout, or
    ``owner/name``, ``owner/name.git``), or None."""
    owner, name = repo.split("/", 1)
    for base in mirrors:
        for cand in (base / f"{owner}+{name}" / "repo", base / f"{owner}+{name}", base / owner / name,
                     base / owner / f"{name}.git"):
            for git_dir in (cand / ".git", cand):
                if (git_dir / "HEAD").is_file() and (git_dir / "objects").is_dir():
                    return git_dir
    return None


def has_commit(git_dir: Path, commit: str) -> bool:
    proc = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip() == commit


def clone_commit(repo: str, commit: str, paths: list[str], cache: Path) -> Path:
    """A bare git dir holding ``commit`` of github.com/``repo`` and the blobs under ``paths``: one commit
    (``--depth 1``) without blobs (``--filter=blob:none``), then exactly the blobs the kit takes.

    ``GPU_KIT_GIT_URL`` (``{owner}``, ``{name}``) points elsewhere, e.g. a company mirror or a local
    ``file://`` repository."""
    git_dir = cache / "git" / (repo.replace("/", "+") + ".git")
    owner, name = repo.split("/", 1)
    url = os.environ.get("GPU_KIT_GIT_URL", "https://github.com/{owner}/{name}.git").format(owner=owner, name=name)
    git = ["git", "--git-dir", str(git_dir)]
    if not (git_dir.is_dir() and has_commit(git_dir, commit)):
        shutil.rmtree(git_dir, ignore_errors=True)
        git_dir.mkdir(parents=True)
        run(["git", "init", "-q", "--bare", str(git_dir)])
        for key, value in (("remote.origin.url", url), ("remote.origin.promisor", "true"),
                           ("remote.origin.partialclonefilter", "blob:none")):
            run(git + ["config", key, value])
    # a local repository serves filters and object ids only when its upload-pack is told to
    up = ["--upload-pack", "git -c uploadpack.allowFilter=true -c uploadpack.allowAnySHA1InWant=true upload-pack"] \
        if "://" not in url or url.startswith("file://") else []
    if not has_commit(git_dir, commit):
        run(git + ["fetch", "-q", *up, "--depth", "1", "--filter=blob:none", "origin", commit])
    if not has_commit(git_dir, commit):
        raise SystemExit(f"{url} did not give commit {commit}")
    listing = run(git + ["ls-tree", "-r", commit, "--", *paths]).stdout.split("\n")
    blobs = "".join(line.split()[2] + "\n" for line in listing if line and line.split()[1] == "blob")
    run(git + ["fetch", "-q", *up, "--no-tags", "--no-write-fetch-head", "--filter=blob:none", "--stdin", "origin"],
        input=blobs)
    return git_dir


def extract_tree(git_dir: Path, tree: Tree, kit: Path) -> list[str]:
    """Write the files of ``tree.paths`` at ``tree.commit`` under ``kit/tree.dest``; their paths in the kit.

    Reads each blob with ``git cat-file`` (a partial mirror that lacks blobs outside the paths is fine; a
    missing blob inside them is an error)."""
    listing = run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "-z", tree.commit, "--", *tree.paths]).stdout
    entries = []
    for item in filter(None, listing.split("\0")):
        meta, path = item.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob":
            entries.append((mode, sha, path))
    if not entries:
        raise SystemExit(f"lock.txt:{tree.line}: {tree.repo}@{tree.commit[:8]} has no files under {tree.paths}")
    found = {p for _, _, p in entries}
    for want in tree.paths:
        if not any(p == want or p.startswith(want.rstrip("/") + "/") for p in found):
            raise SystemExit(f"lock.txt:{tree.line}: {tree.repo}@{tree.commit[:8]} has no {want!r}")
    batch = subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "--batch"],
                           input="".join(f"{sha}\n" for _, sha, _ in entries).encode(), capture_output=True)
    if batch.returncode != 0:
        raise SystemExit(f"git cat-file failed in {git_dir}: {batch.stderr.decode()[-1000:]}")
    data, pos, written = batch.stdout, 0, []
    for mode, sha, path in entries:
        end = data.index(b"\n", pos)
        header = data[pos:end].decode().split()
        if len(header) != 3 or header[1] != "blob":
            raise SystemExit(f"{tree.repo}: blob {sha} of {path} is missing from {git_dir} ({' '.join(header)})")
        size = int(header[2])
        body = data[end + 1 : end + 1 + size]
        pos = end + 1 + size + 1
        rel = Path(*Path(path).parts[tree.strip:])
        target = kit / tree.dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "120000":  # a symbolic link: written as the file it names would be is not possible here
            raise SystemExit(f"{tree.repo}: {path} is a symbolic link; name its target in lock.txt instead")
        target.write_bytes(body)
        if mode == "100755":
            target.chmod(0o755)
        written.append(str(target.relative_to(kit)))
    return written


def fetch_trees(lock: Lock, kit: Path, cache: Path, *, mirrors: list[Path], source: str) -> dict[str, dict]:
    report: dict[str, dict] = {}
    for tree in lock.trees:
        git_dir = None if source == "clone" else local_git_dir(tree.repo, mirrors)
        origin = "local"
        if git_dir is not None and not has_commit(git_dir, tree.commit):
            if source == "mirror":
                raise SystemExit(f"lock.txt:{tree.line}: {git_dir} has no commit {tree.commit} of {tree.repo}")
            git_dir = None
        if git_dir is None:
            if source == "mirror":
                raise SystemExit(f"lock.txt:{tree.line}: no local git dir of {tree.repo} under {[str(m) for m in mirrors]}")
            git_dir, origin = clone_commit(tree.repo, tree.commit, tree.paths, cache), "clone"
        files = extract_tree(git_dir, tree, kit)
        report[f"{tree.repo}@{tree.commit}"] = {"from": origin, "git_dir": str(git_dir), "dest": tree.dest,
                                                "paths": tree.paths, "files": len(files)}
    return report


# ---------------------------------------------------------------------------------------------- shims


def install_shims(kit: Path) -> list[str]:
    """Copy the shims into the kit (over the upstream files where they replace them)."""
    placed = []
    for name, dest in SHIM_LAYOUT.items():
        src, target = SHIMS / name, kit / dest
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, target)
        placed.append(dest)
    for pkg in sorted((SHIMS / SHIM_STUBS).iterdir()):
        target = kit / "site" / pkg.name
        if target.exists():
            raise SystemExit(f"the stub {pkg.name} would replace a real package in the kit's site/")
        shutil.copytree(pkg, target)
        placed.append(f"site/{pkg.name}")
    return placed


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu-kit", help="the kit folder (replaced; default .gpu-kit)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("GPU_KIT_CACHE", Path.home() / ".cache" / "gpu-kit")))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--mirror", type=Path, action="append",
                     help="take trees only from local git dirs under this folder (repeatable)")
    src.add_argument("--clone", action="store_true", help="take trees only from GitHub")
    ap.add_argument("--relock", action="store_true", help="record the sha256 and file of each package in lock.txt")
    ap.add_argument("--lock", type=Path, default=LOCK, help=argparse.SUPPRESS)  # another lock file (tests)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    lock = parse_lock(args.lock.read_text(encoding="utf-8"))
    if args.mirror:
        mirrors, source = args.mirror, "mirror"
    elif args.clone:
        mirrors, source = [], "clone"
    else:
        mirrors = [Path(p) for p in os.environ.get("GPU_KIT_MIRRORS", "/work/.mirror").split(os.pathsep) if p]
        source = "auto"
    kit = args.out.resolve()
    if kit == ROOT or ROOT.is_relative_to(kit):
        raise SystemExit(f"--out {kit} would replace the repository")
    staging = Path(tempfile.mkdtemp(prefix=".gpu-kit-", dir=kit.parent))
    try:
        (staging / "wheels").mkdir()
        packages = fetch_packages(lock, args.cache, staging / "wheels", relock=args.relock)
        if args.relock:
            write_relocked(lock, args.lock)
        trees = fetch_trees(lock, staging, args.cache, mirrors=mirrors, source=source)
        shims = install_shims(staging)
        for cache_dir in list(staging.rglob("__pycache__")):
            shutil.rmtree(cache_dir)
        total = folder_bytes(staging)
        if total > LIMIT_BYTES - REPO_ALLOWANCE:
            raise SystemExit(f"the kit is {total / 2**20:.1f} MiB: over {(LIMIT_BYTES - REPO_ALLOWANCE) / 2**20:.0f} MiB "
                             "(64 MiB per device call, less the repository's own files)")
        info = {
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "lock_sha256": sha256_of(args.lock),
            "bytes": total,
            "packages": packages,
            "trees": trees,
            "shims": shims,
            "sizes": {d.name: folder_bytes(d) for d in sorted(staging.iterdir()) if d.is_dir()},
        }
        (staging / "kit.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if kit.exists():
            # a cache brought back from a GPU run (one .tgz or its 15 MiB parts) survives a rebuild
            for keep in [*kit.glob("triton-cache.tgz"), *kit.glob("triton-cache.tgz.[0-9][0-9]")]:
                shutil.move(str(keep), staging / keep.name)
            shutil.rmtree(kit)
        staging.rename(kit)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in info["sizes"].items())
    print(f"built {kit} in {time.perf_counter() - t0:.1f} s: {total / 2**20:.1f} MiB ({sizes}); "
          f"{len(packages)} packages, {len(trees)} trees ({', '.join(sorted({t['from'] for t in trees.values()}))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
