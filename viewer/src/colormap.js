// Colour maps as a few anchor colours, interpolated linearly into 256-entry tables.

const ANCHORS = {
  gray: ["#000000", "#ffffff"],
  viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779",
    "#6ece58", "#b5de2b", "#fde725"],
  // cyclic: the same colour at -pi and +pi
  phase: ["#2f0f3d", "#4a3ab0", "#4f9fd0", "#d8e9e4", "#d09b4f", "#b03a4a", "#2f0f3d"],
  terrain: ["#333399", "#0294fa", "#01cc66", "#80e680", "#fffe99", "#b09a6f", "#806860",
    "#ffffff"],
  magma: ["#000004", "#2c115f", "#721f81", "#b73779", "#f1605d", "#feb078", "#fcfdbf"],
};

function hex(c) {
  return [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16));
}

const TABLES = {};

/** A Uint8Array(256 * 3) lookup table for a colour map name. */
export function table(name) {
  if (TABLES[name]) return TABLES[name];
  const anchors = (ANCHORS[name] || ANCHORS.gray).map(hex);
  const lut = new Uint8Array(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (anchors.length - 1);
    const k = Math.min(Math.floor(t), anchors.length - 2);
    const w = t - k;
    for (let c = 0; c < 3; c++) {
      lut[i * 3 + c] = Math.round(anchors[k][c] * (1 - w) + anchors[k + 1][c] * w);
    }
  }
  TABLES[name] = lut;
  return lut;
}

/** Paint values into a canvas of the array's size; NaN is drawn transparent. */
export function paint(canvas, values, width, height, vmin, vmax, name) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(width, height);
  const lut = table(name);
  const scale = vmax > vmin ? 255 / (vmax - vmin) : 0;
  for (let i = 0; i < width * height; i++) {
    const v = values[i];
    if (Number.isNaN(v)) continue;
    const k = Math.max(0, Math.min(255, Math.round((v - vmin) * scale))) * 3;
    img.data[i * 4] = lut[k];
    img.data[i * 4 + 1] = lut[k + 1];
    img.data[i * 4 + 2] = lut[k + 2];
    img.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

/** A vertical colour bar (top = vmax). */
export function paintBar(canvas, name) {
  canvas.width = 1;
  canvas.height = 256;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(1, 256);
  const lut = table(name);
  for (let i = 0; i < 256; i++) {
    const k = (255 - i) * 3;
    img.data.set([lut[k], lut[k + 1], lut[k + 2], 255], i * 4);
  }
  ctx.putImageData(img, 0, 0);
}
