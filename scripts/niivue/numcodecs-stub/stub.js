// Stands in for the numcodecs package (blosc, lz4 and zstd WebAssembly codecs, 1.4 MB), which NiiVue
// reaches only through zarrita to read compressed Zarr arrays: the report never loads Zarr.
export default {
  fromConfig() {
    throw new Error("Zarr codecs are not part of m2m's NiiVue bundle");
  },
};
