// The 3D view of a finished job: scene.glb through three.js, the splats through Spark.
// Scene files are in the OpenGL camera frame (camera at the origin looking down -Z, +Y up),
// so a camera at the origin with the photo's field of view sees what the photo saw.

import { SparkRenderer, SplatMesh } from "@sparkjsdev/spark";
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { splitPly } from "./ply.js";

export const BACKGROUND = "#17191e";

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`download failed: HTTP ${response.status}`);
  return response.arrayBuffer();
}

async function fetchJson(url) {
  return JSON.parse(new TextDecoder().decode(await fetchBytes(url)));
}

/** A row-major 4x4 (JSON, column vectors) as a THREE.Matrix4. */
function matrixOf(rows) {
  return new THREE.Matrix4().set(...rows.flat());
}

/** A GLB's scene; files without a material get a matte one showing their vertex colours
 * (glTF's default is fully metallic, which looks black without an environment). */
async function parseGlb(bytes) {
  const gltf = await new GLTFLoader().parseAsync(bytes, "");
  if (!gltf.parser.json.materials) {
    gltf.scene.traverse((node) => {
      if (node.isMesh) {
        node.material.dispose();
        node.material = new THREE.MeshStandardMaterial({
          vertexColors: Boolean(node.geometry.attributes.color),
          metalness: 0,
          roughness: 0.85,
        });
      }
    });
  }
  return gltf.scene;
}

function disposeTree(root) {
  root.traverse((node) => {
    node.geometry?.dispose();
    const materials = Array.isArray(node.material) ? node.material : [node.material];
    for (const m of materials) m?.dispose();
  });
}

export class Viewer {
  /** Throws when the browser has no WebGL2. */
  constructor(container) {
    this.container = container;
    const renderer = new THREE.WebGLRenderer({ antialias: false });
    renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    renderer.setClearColor(BACKGROUND, 1);
    this.renderer = renderer;
    const canvas = renderer.domElement;
    canvas.tabIndex = 0;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", "3D view of the result");
    canvas.dataset.testid = "viewer-canvas";
    container.appendChild(canvas);
    container.style.backgroundColor = BACKGROUND; // what the tests compare pixels against

    this.scene = new THREE.Scene();
    this.camera = new THREE.PerspectiveCamera(50, 4 / 3, 0.01, 1000);
    this.scene.add(this.camera);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x3a3f4a, 1.3));
    const key = new THREE.DirectionalLight(0xffffff, 1.3);
    key.position.set(0.5, 1, 0.8);
    this.camera.add(key); // the light follows the view

    this.spark = new SparkRenderer({ renderer, onDirty: () => this.requestRender() });
    this.scene.add(this.spark);

    this.controls = new OrbitControls(this.camera, canvas);
    this.controls.listenToKeyEvents(canvas);
    this.controls.addEventListener("change", () => this.requestRender());

    this.meshRoot = null;
    this.meshNodes = [];
    this.splats = [];
    this.visible = [];
    this.mode = "splats";
    this.home = null;
    this.frames = 0;
    this.loadToken = 0;
    this.pending = false;

    new ResizeObserver(() => this.#resize()).observe(container);
    this.#resize();
  }

  /** Loads a job's result (the `result` of GET /v1/jobs/{id}); resolves when shown. Uses
   * the scene files when the job made them (scene.glb, scene.ply), else each object's own
   * files (GLB; PLY or SPZ splats) placed by its matrix, whatever `formats` asked for. */
  async load(result) {
    const token = ++this.loadToken;
    this.clear();
    this.#state("loading");
    const scene = result.scene || {};
    const [meshRoot, manifest] = await Promise.all([
      this.#meshes(result),
      fetchJson(result.manifest.url).catch(() => null),
    ]);
    if (token !== this.loadToken) {
      if (meshRoot) disposeTree(meshRoot);
      return false;
    }
    const count = result.objects.length;
    const ply = scene.gaussian_ply ? await fetchBytes(scene.gaussian_ply.url) : null;
    const splats = await this.#splatMeshes(result, ply, manifest);
    if (token !== this.loadToken) {
      if (meshRoot) disposeTree(meshRoot);
      for (const s of splats) s.dispose();
      return false;
    }
    this.meshRoot = meshRoot || new THREE.Group();
    // Meshes drawn with a baked base-colour texture (option "texture"), as GLTFLoader made them.
    let textured = 0;
    this.meshRoot.traverse((node) => {
      if (node.isMesh && node.material?.map) textured += 1;
    });
    this.container.dataset.meshTextures = String(textured);
    this.meshNodes = Array.from({ length: count }, (_, i) =>
      this.meshRoot.getObjectByName(`object_${i}`),
    );
    this.splats = splats;
    this.visible = new Array(count).fill(true);
    this.scene.add(this.meshRoot);
    for (const s of this.splats) this.scene.add(s);
    this.#frame(result.camera);
    this.#apply();
    this.#state("ready");
    return true;
  }

  /** The meshes as one tree with a node `object_{i}` per object: scene.glb, or each
   * object's GLB under a node carrying its matrix; null when the job made no GLB. */
  async #meshes(result) {
    const sceneGlb = result.scene?.mesh_glb;
    if (sceneGlb) {
      this.container.dataset.meshSource = "scene.glb";
      return parseGlb(await fetchBytes(sceneGlb.url));
    }
    const files = result.objects.map((obj) => obj.mesh_glb);
    if (!files.every(Boolean)) {
      this.container.dataset.meshSource = "none";
      return null;
    }
    this.container.dataset.meshSource = "objects";
    const root = new THREE.Group();
    const parts = await Promise.all(files.map(async (art) => parseGlb(await fetchBytes(art.url))));
    parts.forEach((part, i) => {
      const node = new THREE.Group();
      node.name = `object_${i}`;
      matrixOf(result.objects[i].metadata.matrix).decompose(node.position, node.quaternion, node.scale);
      node.add(part);
      root.add(node);
    });
    return root;
  }

  /** One SplatMesh per object: cut from scene.ply when the manifest gives the counts, else
   * each object's PLY or SPZ placed by its matrix. */
  async #splatMeshes(result, sceneBytes, manifest) {
    const counts = manifest?.objects?.map((o) => o.num_splats);
    const parts =
      sceneBytes && counts && counts.length === result.objects.length
        ? splitPly(sceneBytes, counts)
        : null;
    let meshes;
    if (parts) {
      this.container.dataset.splatSource = "scene.ply";
      meshes = parts.map((bytes, i) => new SplatMesh({ fileBytes: bytes, fileName: `${i}.ply` }));
    } else {
      const kind = result.objects.every((o) => o.gaussian_ply) ? "ply" : "spz";
      const key = kind === "ply" ? "gaussian_ply" : "gaussian_spz";
      if (!result.objects.every((o) => o[key])) {
        this.container.dataset.splatSource = "none";
        return [];
      }
      this.container.dataset.splatSource = `objects-${kind}`;
      meshes = await Promise.all(
        result.objects.map(async (obj, i) => {
          const bytes = await fetchBytes(obj[key].url);
          const mesh = new SplatMesh({ fileBytes: bytes, fileName: `${i}.${kind}` });
          matrixOf(obj.metadata.matrix).decompose(mesh.position, mesh.quaternion, mesh.scale);
          return mesh;
        }),
      );
    }
    await Promise.all(meshes.map((m) => m.initialized));
    return meshes;
  }

  clear() {
    if (this.meshRoot) {
      this.scene.remove(this.meshRoot);
      disposeTree(this.meshRoot);
    }
    for (const s of this.splats) {
      this.scene.remove(s);
      s.dispose();
    }
    this.meshRoot = null;
    this.meshNodes = [];
    this.splats = [];
    this.visible = [];
    this.#state("empty");
    this.requestRender();
  }

  /** "splats", "mesh" or "both". */
  setMode(mode) {
    this.mode = mode;
    this.container.dataset.mode = mode;
    this.#apply();
  }

  setObjectVisible(index, on) {
    this.visible[index] = on;
    this.#apply();
  }

  resetView() {
    if (!this.home) return;
    this.camera.position.set(0, 0, 0);
    this.controls.target.copy(this.home);
    this.controls.update();
    this.requestRender();
  }

  requestRender() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.renderer.render(this.scene, this.camera);
      this.frames += 1;
      this.container.dataset.frames = String(this.frames);
    });
  }

  #apply() {
    const meshes = this.mode !== "splats";
    const splats = this.mode !== "mesh";
    this.meshNodes.forEach((node, i) => {
      if (node) node.visible = meshes && this.visible[i];
    });
    this.splats.forEach((s, i) => {
      s.visible = splats && this.visible[i];
    });
    this.requestRender();
  }

  /** The photo's camera: at the origin, its vertical field of view from K; the orbit
   * target at the centre of the scene's meshes. */
  #frame(camera) {
    const box = new THREE.Box3().setFromObject(this.meshRoot);
    const centre = box.isEmpty() ? new THREE.Vector3(0, 0, -3) : box.getCenter(new THREE.Vector3());
    const radius = box.isEmpty() ? 1 : box.getSize(new THREE.Vector3()).length() / 2;
    if (camera?.K && camera.height) {
      const fy = camera.K[1][1];
      this.camera.fov = THREE.MathUtils.radToDeg(2 * Math.atan(camera.height / 2 / fy));
      this.container.style.setProperty("--photo-aspect", `${camera.width} / ${camera.height}`);
    }
    const distance = centre.length();
    this.camera.near = Math.max(1e-3, (distance - 4 * radius) * 0.05, distance * 1e-3);
    this.camera.far = distance + 50 * radius + 10;
    this.camera.updateProjectionMatrix();
    this.controls.minDistance = radius * 0.05;
    this.controls.maxDistance = (distance + radius) * 10;
    this.home = centre;
    this.#resize();
    this.resetView();
  }

  #resize() {
    const { clientWidth: w, clientHeight: h } = this.container;
    if (!w || !h) return;
    this.renderer.setSize(w, h, false);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
    this.requestRender();
  }

  #state(state) {
    this.container.dataset.state = state;
  }
}
