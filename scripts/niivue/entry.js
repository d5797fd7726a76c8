// What m2m's report viewer uses of NiiVue; the bundle exposes it as the global `niivue`.
export { Niivue, NVImage, NVMesh, SLICE_TYPE, SHOW_RENDER, MULTIPLANAR_TYPE } from "@niivue/niivue";
