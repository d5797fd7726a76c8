// Writes the licence notices and the record of m2m's NiiVue bundle (called by build.sh).
// Usage: node notices.mjs METAFILE BUNDLE_NAME NIIVUE_LICENSE OUT_DIR
// Every npm package with code in the bundle (from esbuild's metafile) gets its name, version,
// licence and licence text in OUT_DIR/THIRD_PARTY_LICENSES.txt; NiiVue's own licence (the npm
// package ships none: the text is that of github.com/niivue/niivue) goes to OUT_DIR/NIIVUE_LICENSE.txt;
// OUT_DIR/niivue.json records what was built.
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [metafile, bundleName, niivueLicense, outDir] = process.argv.slice(2);
const meta = JSON.parse(readFileSync(metafile, "utf8"));
const output = Object.values(meta.outputs)[0];
const packages = new Map();
for (const [input, { bytesInOutput }] of Object.entries(output.inputs)) {
  const match = input.match(/^node_modules\/((?:@[^/]+\/)?[^/]+)\//);
  if (!match || bytesInOutput === 0) continue;
  packages.set(match[1], (packages.get(match[1]) ?? 0) + bytesInOutput);
}
const lock = JSON.parse(readFileSync("package-lock.json", "utf8")).packages;
const bundled = [...packages.keys()].sort().map((name) => {
  const folder = join("node_modules", name);
  const manifest = JSON.parse(readFileSync(join(folder, "package.json"), "utf8"));
  const licenceFile = readdirSync(folder).find((f) => /^(licen[cs]e|copying)/i.test(f));
  return {
    name,
    version: manifest.version,
    license: manifest.license,
    integrity: lock[folder].integrity,
    bytes_in_bundle: packages.get(name),
    text: licenceFile ? readFileSync(join(folder, licenceFile), "utf8").trim() : null,
  };
});
const niivue = bundled.find((p) => p.name === "@niivue/niivue");
niivue.text = readFileSync(niivueLicense, "utf8").trim();
const missing = bundled.filter((p) => !p.text && p.license !== "MIT").map((p) => p.name);
if (missing.length) throw new Error(`no licence text for ${missing.join(", ")}`);
const notices = bundled
  .map((p) => `${p.name} ${p.version} (${p.license})\n\n${p.text ?? `${p.license} licence; the package ships no licence file.`}`)
  .join("\n\n" + "-".repeat(72) + "\n\n");
writeFileSync(join(outDir, "NIIVUE_LICENSE.txt"), niivue.text + "\n");
writeFileSync(
  join(outDir, "THIRD_PARTY_LICENSES.txt"),
  `The packages bundled in ${bundleName} (m2m's build of NiiVue), with their licences.\n\n${notices}\n`,
);
const esbuild = JSON.parse(readFileSync("node_modules/esbuild/package.json", "utf8")).version;
const record = {
  package: "@niivue/niivue",
  version: niivue.version,
  license: niivue.license,
  homepage: "https://github.com/niivue/niivue",
  npm_integrity: niivue.integrity,
  bundle: bundleName,
  built_with: `esbuild ${esbuild}: scripts/niivue/build.sh (IIFE, global "niivue", minified, target es2020)`,
  left_out: "numcodecs (Zarr's blosc, lz4 and zstd WebAssembly codecs): the report loads no Zarr",
  bundled: bundled.map(({ text, ...rest }) => rest),
};
writeFileSync(join(outDir, "niivue.json"), JSON.stringify(record, null, 2) + "\n");
