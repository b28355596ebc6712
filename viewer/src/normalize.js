// The release loader's normalization (nasar_zarr/normalize.py), in JavaScript.
//
// float32 arithmetic is emulated with Math.fround after every operation, so
// +, -, *, / and clip give the same bits as numpy's float32 ufuncs. log1p is
// Math.log1p in float64 rounded once to float32 (correctly rounded); numpy's
// float32 log1p calls the C library's log1pf, which is not always correctly
// rounded (glibc 2.36: 1 ulp off for ~7% of inputs), so RTC values can differ
// from ds.nasar.normalized() by that last bit. dem, slope and dem_relief have
// no transcendental step and are bit-exact.

const f = Math.fround;

export const RTC_GAIN = 20.0;
export const RTC_RANGES = { co: [0.15, 2.39], cross: [0.01, 1.09] };
export const DEM_RANGE = [-100.0, 4000.0];
export const RELIEF_PERCENTILES = [5.0, 95.0];
export const SLOPE_RANGE = [0.0, 45.0];

/** clip(log1p(gain * x)) rescaled to [0, 1] for one channel (float32). */
export function rtcNormalized(x, [low, high], present = true, gain = RTC_GAIN) {
  const lo = f(low);
  const hi = f(high);
  const g = f(gain);
  const span = f(hi - lo);
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    let v = f(Math.log1p(f(x[i] * g)));
    if (v < lo) v = lo;
    else if (v > hi) v = hi; // NaN fails both tests and stays NaN
    out[i] = f(f(v - lo) / span);
  }
  // With p1 >= 0 a zero channel already maps to exactly 0; a negative low end
  // needs the explicit mask ("fully missing polarizations remain zero-padded").
  if (lo < 0 && !present && !Number.isNaN(out[0])) out.fill(0);
  return out;
}

/** clip_and_rescale(x, low, high) in float32 (dem, slope). */
export function rescaled(x, [low, high]) {
  const lo = f(low);
  const hi = f(high);
  const span = f(hi - lo);
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    let v = x[i];
    if (v < lo) v = lo;
    else if (v > hi) v = hi;
    out[i] = f(f(v - lo) / span);
  }
  return out;
}

/** numpy.percentile(values, q) with the default "linear" method, on a sorted Float64Array. */
export function percentileSorted(sorted, q) {
  const n = sorted.length;
  const vi = (n - 1) * (q / 100);
  let prev = Math.floor(vi);
  let next = prev + 1;
  if (vi >= n - 1) {
    prev = n - 1;
    next = n - 1;
  }
  if (vi < 0) {
    prev = 0;
    next = 0;
  }
  const gamma = vi - prev;
  const a = sorted[prev];
  const b = sorted[next];
  const diff = b - a;
  return gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma;
}

/** Patch-local relief: clip to the patch's own p5/p95 (float64, NaN ignored), rescale. */
export function demRelief(dem, [pLow, pHigh] = RELIEF_PERCENTILES) {
  const finite = [];
  for (let i = 0; i < dem.length; i++) if (!Number.isNaN(dem[i])) finite.push(dem[i]);
  const out = new Float32Array(dem.length);
  if (finite.length === 0) return out.fill(NaN);
  const sorted = Float64Array.from(finite).sort();
  const lo = percentileSorted(sorted, pLow);
  const hi = percentileSorted(sorted, pHigh);
  const span = hi - lo > 0 ? hi - lo : 1.0;
  for (let i = 0; i < dem.length; i++) {
    let v = dem[i];
    if (v < lo) v = lo;
    else if (v > hi) v = hi;
    out[i] = (v - lo) / span;
  }
  return out;
}
