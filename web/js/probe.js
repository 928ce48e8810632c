// The latency-probe frame id: a strip of black/white blocks in the top 1/8 of a frame.
// Mirrors livediff/transport/probe.py exactly (read that docstring for the format):
// 2 rows x 16 columns; block (r, c) covers x in [floor(c*W/16), floor((c+1)*W/16)) and
// y in [floor(r*H/16), floor((r+1)*H/16)); 32 bits MSB first = 24-bit id, then CRC-8/I-432-1
// (poly 0x07, init 0, xorout 0x55) of the id's 3 big-endian bytes; 1 = white, 0 = black.

export const ROWS = 2;
export const COLUMNS = 16;
export const BITS = ROWS * COLUMNS;
export const ID_BITS = 24;
export const MAX_ID = (1 << ID_BITS) - 1;
const MIN_CONTRAST = 48;

/** CRC-8/I-432-1 of a byte array. */
export function crc8(bytes) {
  let crc = 0;
  for (const byte of bytes) {
    crc ^= byte;
    for (let i = 0; i < 8; i++) {
      crc = crc & 0x80 ? ((crc << 1) ^ 0x07) & 0xff : (crc << 1) & 0xff;
    }
  }
  return crc ^ 0x55;
}

function idBytes(id) {
  return [(id >>> 16) & 0xff, (id >>> 8) & 0xff, id & 0xff];
}

/** The 32 block values (0 or 1) for `id`, in reading order. */
export function encodeBits(id) {
  if (!Number.isInteger(id) || id < 0 || id > MAX_ID) {
    throw new RangeError(`frame id must be in 0..${MAX_ID}, got ${id}`);
  }
  const check = crc8(idBytes(id));
  const bits = [];
  for (let i = ID_BITS - 1; i >= 0; i--) bits.push((id >>> i) & 1);
  for (let i = 7; i >= 0; i--) bits.push((check >>> i) & 1);
  return bits;
}

/** [y0, y1, x0, x1] of block `index` in a width x height frame. */
export function block(width, height, index) {
  const row = Math.floor(index / COLUMNS);
  const column = index % COLUMNS;
  return [
    Math.floor((row * height) / 16),
    Math.floor(((row + 1) * height) / 16),
    Math.floor((column * width) / COLUMNS),
    Math.floor(((column + 1) * width) / COLUMNS),
  ];
}

/** Paint `id` into the top strip of a 2D canvas context of size width x height. */
export function paint(ctx, width, height, id) {
  encodeBits(id).forEach((bit, index) => {
    const [y0, y1, x0, x1] = block(width, height, index);
    ctx.fillStyle = bit ? "#ffffff" : "#000000";
    ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
  });
}

/** Rows of the frame the strip occupies (what `read` needs of an image). */
export function stripHeight(height) {
  return Math.floor((ROWS * height) / 16);
}

/**
 * The id painted in `pixels` (RGBA bytes, row-major, `width` wide, at least `stripHeight(height)`
 * rows of a frame `height` tall), or null when there is none. Each block's middle half is averaged
 * (mean of R, G, B, like probe.read on RGB input), thresholded at the midpoint of the darkest and
 * brightest block means; too little contrast or a CRC mismatch gives null (never a guess).
 */
export function read(pixels, width, height) {
  if (height < 16 || width < COLUMNS * 2) return null;
  const means = new Float64Array(BITS);
  for (let index = 0; index < BITS; index++) {
    const [y0, y1, x0, x1] = block(width, height, index);
    const dy = Math.max(1, Math.floor((y1 - y0) / 4));
    const dx = Math.max(1, Math.floor((x1 - x0) / 4));
    let sum = 0;
    let count = 0;
    for (let y = y0 + dy; y < y1 - dy; y++) {
      let offset = (y * width + x0 + dx) * 4;
      for (let x = x0 + dx; x < x1 - dx; x++, offset += 4) {
        sum += pixels[offset] + pixels[offset + 1] + pixels[offset + 2];
        count += 3;
      }
    }
    means[index] = count ? sum / count : NaN;
  }
  let low = Infinity;
  let high = -Infinity;
  for (const m of means) {
    if (Number.isNaN(m)) return null;
    low = Math.min(low, m);
    high = Math.max(high, m);
  }
  if (high - low < MIN_CONTRAST) return null;
  const threshold = (low + high) / 2;
  let id = 0;
  for (let i = 0; i < ID_BITS; i++) id = id * 2 + (means[i] > threshold ? 1 : 0);
  let check = 0;
  for (let i = ID_BITS; i < BITS; i++) check = check * 2 + (means[i] > threshold ? 1 : 0);
  return crc8(idBytes(id)) === check ? id : null;
}
