// The 3D view: Gaussian splats (Spark, one SplatMesh per object) and meshes (scene.glb via GLTFLoader) in one
// three.js scene. The scene files are in the job's frame (opencv, opengl or pytorch3d); `root` turns that frame
// into three.js's (x right, y up, camera looking down -z). The default view is the photo's own camera.
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { SparkRenderer, SplatMesh } from "@sparkjsdev/spark";

export const BACKGROUND = 0x20232a;
const TO_THREE = { opengl: [1, 1, 1], opencv: [1, -1, -1], pytorch3d: [-1, 1, -1] }; // diagonal frame changes

// Our meshes carry vertex colours and no material: glTF's default material is fully metallic, which renders
// them nearly black without an environment map. Show them matte, with smooth normals when the file has none.
function matte(node) {
  if (!node.isMesh) return;
  const geometry = node.geometry;
  if (!geometry.attributes.normal) geometry.computeVertexNormals();
  node.material.metalness = 0;
  node.material.roughness = 0.9;
  node.material.vertexColors = Boolean(geometry.attributes.color);
  node.material.flatShading = false;
  node.material.needsUpdate = true;
}

export class Viewer {
  constructor(canvas) {
    this.canvas = canvas;
    this.renderer = new THREE.WebGLRenderer({ canvas, antialias: false, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(1);
    this.renderer.setClearColor(BACKGROUND, 1);
    this.scene = new THREE.Scene();
    this.spark = new SparkRenderer({ renderer: this.renderer });
    this.scene.add(this.spark);
    this.scene.add(new THREE.AmbientLight(0xffffff, 1.2));
    const sun = new THREE.DirectionalLight(0xffffff, 1.5);
    sun.position.set(1, 2, 1);
    this.scene.add(sun);
    this.camera = new THREE.PerspectiveCamera(50, 1, 0.01, 100);
    this.controls = new OrbitControls(this.camera, canvas);
    this.root = new THREE.Group();
    this.scene.add(this.root);
    this.splats = new THREE.Group();
    this.meshes = new THREE.Group();
    this.root.add(this.splats, this.meshes);
    this.mode = "splats";
    this.objects = new Map(); // id -> {splat, node}
    this.home = { target: new THREE.Vector3(0, 0, -2) };
    this.frames = 0;
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
    this.renderer.setAnimationLoop(() => {
      this.controls.update();
      this.renderer.render(this.scene, this.camera);
      this.frames++;
    });
  }

  resize() {
    const w = this.canvas.clientWidth || 640, h = this.canvas.clientHeight || 420;
    this.renderer.setSize(w, h, false);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
  }

  clear() {
    for (const group of [this.splats, this.meshes]) {
      for (const child of [...group.children]) {
        group.remove(child);
        child.dispose?.();
      }
    }
    this.objects.clear();
  }

  // job: the API's job detail; fetchBytes(url) -> ArrayBuffer (adds the token when there is one).
  async load(job, fetchBytes) {
    this.clear();
    const d = TO_THREE[job.scene.frame] || TO_THREE.opencv;
    this.root.matrix.makeScale(d[0], d[1], d[2]);
    this.root.matrix.decompose(this.root.position, this.root.quaternion, this.root.scale);
    const centres = [];
    const tasks = [];
    for (const obj of job.objects) {
      if (!obj.splat_matrix) continue;
      const entry = { splat: null, node: null };
      this.objects.set(obj.id, entry);
      const m = new THREE.Matrix4().fromArray(obj.splat_matrix);
      centres.push(new THREE.Vector3().setFromMatrixPosition(m).applyMatrix4(this.root.matrix));
      if (obj.files["gaussians.ply"]) {
        tasks.push(fetchBytes(obj.files["gaussians.ply"]).then(async (bytes) => {
          const splat = new SplatMesh({ fileBytes: bytes, fileType: "ply", fileName: "gaussians.ply" });
          m.decompose(splat.position, splat.quaternion, splat.scale);
          await splat.initialized;
          entry.splat = splat;
          this.splats.add(splat);
        }));
      }
    }
    if (job.scene.scene_glb_url) {
      tasks.push(fetchBytes(job.scene.scene_glb_url).then((bytes) => new Promise((resolve, reject) => {
        new GLTFLoader().parse(bytes, "", (gltf) => {
          gltf.scene.traverse(matte);
          this.meshes.add(gltf.scene);
          for (const obj of job.objects) {
            const entry = this.objects.get(obj.id);
            if (entry && obj.node) entry.node = gltf.scene.getObjectByName(obj.node) || null;
          }
          resolve();
        }, reject);
      })));
    }
    await Promise.all(tasks);
    const centre = new THREE.Vector3();
    centres.forEach((c) => centre.add(c));
    if (centres.length) centre.divideScalar(centres.length); else centre.set(0, 0, -2);
    this.home.target.copy(centre);
    this.setMode(this.mode);
    this.resetView();
  }

  setMode(mode) {
    this.mode = mode;
    this.splats.visible = mode === "splats" || mode === "both";
    this.meshes.visible = mode === "mesh" || mode === "both";
  }

  setVisible(id, visible) {
    const entry = this.objects.get(id);
    if (!entry) return;
    if (entry.splat) entry.splat.visible = visible;
    if (entry.node) entry.node.visible = visible;
  }

  resetView() {
    this.camera.position.set(0, 0, 0); // the photo's camera
    this.controls.target.copy(this.home.target);
    this.camera.lookAt(this.home.target);
    this.controls.update();
  }

  async settle(frames = 8) {
    const start = this.frames;
    while (this.frames < start + frames) await new Promise((r) => requestAnimationFrame(r));
  }
}
