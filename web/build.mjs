// Copy the browser modules the web page imports from node_modules into pipeline/driver/web/static/vendor/
// (no CDN at run time). Starts from the entry files below and follows their relative imports, so only what
// the page needs is copied; each package's LICENSE goes along. Run by `npm run build` after `npm ci`.
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "node_modules");
const out = resolve(here, "..", "pipeline", "driver", "web", "static", "vendor");

const entries = [
  "three/build/three.module.js",
  "three/examples/jsm/controls/OrbitControls.js",
  "three/examples/jsm/loaders/GLTFLoader.js",
  "three/examples/jsm/postprocessing/Pass.js",
  "@sparkjsdev/spark/dist/spark.module.js",
];
const licences = ["three/LICENSE", "@sparkjsdev/spark/LICENSE", "fflate/LICENSE"];

const importRe = /(?:import|export)\s[^'"]*?from\s*["'](\.{1,2}\/[^"']+)["']|import\s*\(?\s*["'](\.{1,2}\/[^"']+)["']/g;

function copyWithDeps(rel, seen) {
  if (seen.has(rel)) return;
  seen.add(rel);
  const src = join(modules, rel);
  if (!existsSync(src)) throw new Error(`missing ${src}: run \`npm ci\` in web/ first`);
  const dst = join(out, rel);
  mkdirSync(dirname(dst), { recursive: true });
  cpSync(src, dst);
  const text = readFileSync(src, "utf8");
  for (const m of text.matchAll(importRe)) {
    const spec = m[1] ?? m[2];
    copyWithDeps(join(dirname(rel), spec), seen);
  }
}

rmSync(out, { recursive: true, force: true });
const seen = new Set();
for (const entry of entries) copyWithDeps(entry, seen);
for (const lic of licences) {
  mkdirSync(dirname(join(out, lic)), { recursive: true });
  cpSync(join(modules, lic), join(out, lic));
}
const versions = Object.fromEntries(
  ["three", "@sparkjsdev/spark", "fflate"].map((p) => [p, JSON.parse(readFileSync(join(modules, p, "package.json"), "utf8")).version]),
);
writeFileSync(join(out, "versions.json"), JSON.stringify({ versions, files: [...seen].sort() }, null, 2) + "\n");
console.log(`web assets: ${seen.size} module(s) copied to ${out} (${Object.entries(versions).map(([k, v]) => `${k} ${v}`).join(", ")})`);
