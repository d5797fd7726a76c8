// m2m's report viewer (inlined in sub-<label>.html by m2m_app/reports/viewer.py).
// A classic script, no fetch, no ES module: the page works when opened from file://. It runs after
// two classic scripts in the unit's figures/ folder: NiiVue (global `niivue`) and the unit's data
// (global `m2mViewerData`: base64 NIfTI volumes and a TRX tractogram). Every outcome ends in
// the status line under the viewer (#viewer-status, data-state "ready" or "failed"), so that a
// broken viewer never looks like an empty brain; the static figures stay on the page whatever
// happens here.
(function () {
  "use strict";
  const root = document.getElementById("viewer");
  const status = document.getElementById("viewer-status");
  const readout = document.getElementById("viewer-readout");

  function finish(text, state) {
    status.textContent = "viewer: " + text;
    status.dataset.state = state;
    status.dataset.ms = String(Math.round(performance.now()));
    status.className = state === "failed" ? "error" : "note";
  }

  function bytes(base64) {
    const text = atob(base64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out.buffer;
  }

  function number(value) {
    return Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
  }

  // One line for the crosshair: its position (mm, RAS+) and the value of every volume under it (read
  // from the decoded volumes, shown or not).
  function describe(mm, volumes, images) {
    const parts = volumes.map((volume, i) => {
      const vox = images[i].mm2vox(mm);
      if (volume.rgb) {
        const rgb = images[i].getValues(vox[0], vox[1], vox[2]).slice(0, 3).map((b) => number((b * volume.rgb) / 255));
        return `${volume.title} (${rgb.join(", ")})`;
      }
      return `${volume.title} ${number(images[i].getValue(vox[0], vox[1], vox[2]))}`;
    });
    const position = Array.from(mm.slice(0, 3), (v) => v.toFixed(0)).join(", ");
    return `crosshair at (${position}) mm: ${parts.join(" · ")}`;
  }

  const common = { backColor: [0, 0, 0, 1], dragAndDropEnabled: false, loadingText: "", logLevel: "warn" };

  // The T1w and one overlay at a time in three planes, with the crosshair read-out; returns the
  // number of volumes decoded. Only the T1w and the chosen overlay are on the GPU: each volume
  // added makes NiiVue redo every layer's textures, seconds for six volumes in software WebGL.
  async function showSlices(data) {
    const slices = new niivue.Niivue({
      ...common,
      sliceType: niivue.SLICE_TYPE.MULTIPLANAR,
      multiplanarShowRender: niivue.SHOW_RENDER.NEVER,
      isColorbar: true,
    });
    window.m2mNiivue.slices = slices;
    await slices.attachTo("viewer-slices");
    const images = [];
    for (const volume of data.volumes) {
      const image = await niivue.NVImage.loadFromUrl({
        url: bytes(volume.nifti),
        name: volume.name,
        colormap: volume.colormap || "gray",
        cal_min: volume.display[0],
        cal_max: volume.display[1],
      });
      image.colorbarVisible = images.length > 0 && !volume.rgb;
      images.push(image);
    }
    const select = document.getElementById("viewer-overlay");
    const opacity = document.getElementById("viewer-opacity");
    let overlay = null;
    const update = () => {
      const picked = images[data.volumes.findIndex((volume, i) => i > 0 && volume.key === select.value)] || null;
      if (picked) picked.opacity = Number(opacity.value);
      if (picked === overlay) {
        slices.updateGLVolume();
        return;
      }
      if (overlay) slices.removeVolume(overlay);
      if (picked) slices.addVolume(picked);
      overlay = picked;
    };
    slices.addVolume(images[0]);
    update();
    select.addEventListener("change", update);
    opacity.addEventListener("input", update);
    slices.onLocationChange = (location) => {
      readout.textContent = describe(location.mm, data.volumes, images);
    };
    slices.createOnLocationChange();
    return images.filter((image) => image.hdr && image.hdr.dims[1] > 0).length;
  }

  // The streamline subset in 3D, coloured by direction; returns what it shows.
  async function showTracts(data) {
    if (!data.tractogram) {
      document.getElementById("viewer-tracts").parentElement.hidden = true;
      return "no tractogram";
    }
    const tracts = new niivue.Niivue({ ...common, sliceType: niivue.SLICE_TYPE.RENDER, isOrientCube: true });
    window.m2mNiivue.tracts = tracts;
    await tracts.attachTo("viewer-tracts");
    await tracts.loadFromArrayBuffer(bytes(data.tractogram.trx), data.tractogram.name);
    const mesh = tracts.meshes[0];
    tracts.setMeshProperty(mesh.id, "fiberDither", 0);
    tracts.setMeshProperty(mesh.id, "fiberColor", "Local"); // by direction: red L-R, green A-P, blue I-S
    tracts.setRenderAzimuthElevation(110, 15);
    // Streamlines NiiVue holds with two points or more (what it can draw).
    let loaded = 0;
    for (let i = 0; i + 1 < mesh.offsetPt0.length; i++) {
      if (mesh.offsetPt0[i + 1] - mesh.offsetPt0[i] > 1) loaded++;
    }
    const total = data.tractogram.total.toLocaleString("en-US");
    return `${loaded.toLocaleString("en-US")} of ${total} streamlines`;
  }

  async function start(data) {
    window.m2mNiivue = {};
    const [count, streamlines] = await Promise.all([showSlices(data), showTracts(data)]);
    finish(`${count} volume${count === 1 ? "" : "s"}, ${streamlines}`, "ready");
  }

  if (!window.m2mViewerData) {
    finish("no data: the data script in this unit's figures folder did not load (was the folder moved away?)", "failed");
  } else if (!window.niivue) {
    finish("NiiVue did not load (niivue.min.js in this unit's figures folder)", "failed");
  } else if (!document.createElement("canvas").getContext("webgl2")) {
    root.querySelector(".viewer-panes").hidden = true;
    finish("this browser has no WebGL2, which the viewer needs: the static figures below show the same data", "failed");
  } else {
    start(window.m2mViewerData).catch((error) => finish(`failed: ${error && error.message ? error.message : error}`, "failed"));
  }
})();
