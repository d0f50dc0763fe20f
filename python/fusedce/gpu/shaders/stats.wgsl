// Per-token statistics: one workgroup per sample (a row of (N, C), or a
// spatial position of (N, C, d1..dK), whose classes are `spatial` apart),
// as the CPU kernel computes them (rust/core/src/kernels/stats.rs):
//
// z = softcap * tanh(x / softcap) / temperature (softcap 0: none), m = max z,
// s = sum exp(z - m), t = sum exp(z - m) * (m - z) (a masked class, z = -inf,
// clamped so it adds 0): lse = m + log s, logprob = (z_y - m) - log s,
// entropy = log s + t / s. The argmax, the rank (classes with x > x_y) and the
// top-k are those of the logits x, ties to the lower index. The top-k is
// found one class at a time: the best class after the previous one in the
// order (value descending, index ascending), k workgroup reductions.
// With want_grad, x is overwritten by the gradient of
// gl * logprob + ge * entropy through the softcap and the temperature:
// p (ge (mu - d) - gl) + gl [c = y], times sech^2(x / softcap) / temperature.

struct Params {
    samples: u32,
    classes: u32,
    spatial: u32,
    groups_x: u32,
    temperature: f32,
    softcap: f32,      // 0: none
    top_k: u32,
    want_grad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> tgt: array<i32>;      // class per sample; -1 = none
@group(0) @binding(3) var<storage, read> up: array<f32>;       // (gl, ge) per sample
@group(0) @binding(4) var<storage, read_write> fout: array<f32>;  // (lse, logprob, entropy) per sample
@group(0) @binding(5) var<storage, read_write> iout: array<i32>;  // (argmax, rank) per sample
@group(0) @binding(6) var<storage, read_write> topv: array<f32>;  // top_k log-probs per sample
@group(0) @binding(7) var<storage, read_write> topi: array<i32>;  // top_k classes per sample

const WG: u32 = 256u;
const D_FLOOR: f32 = -1.0e4;
var<workgroup> red_f: array<f32, 256>;
var<workgroup> red_g: array<f32, 256>;
var<workgroup> red_u: array<u32, 256>;

fn score(v: f32) -> f32 {
    var z = v;
    if (P.softcap > 0.0) { z = P.softcap * tanh(v / P.softcap); }
    return z / P.temperature;
}

fn slope(v: f32) -> f32 {
    var s = 1.0;
    if (P.softcap > 0.0) {
        let ch = cosh(v / P.softcap);
        s = 1.0 / (ch * ch);
    }
    return s / P.temperature;
}

// (a, ia) comes before (b, ib): larger, or equal with a lower index.
fn before(a: f32, ia: u32, b: f32, ib: u32) -> bool {
    return a > b || (a == b && ia < ib);
}

fn reduce_max(lid: u32, v: f32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    if (lid < 16u) {
        var r = red_f[lid * 16u];
        for (var j = 1u; j < 16u; j++) { r = max(r, red_f[lid * 16u + j]); }
        red_f[lid * 16u] = r;
    }
    workgroupBarrier();
    var m = red_f[0];
    for (var j = 1u; j < 16u; j++) { m = max(m, red_f[j * 16u]); }
    workgroupBarrier();
    return m;
}

// The best (value, index) pair of the workgroup; index 0xffffffff: none.
fn reduce_best(lid: u32, v: f32, i: u32) -> vec2<u32> {
    red_f[lid] = v;
    red_u[lid] = i;
    workgroupBarrier();
    if (lid < 16u) {
        var bv = red_f[lid * 16u];
        var bi = red_u[lid * 16u];
        for (var j = 1u; j < 16u; j++) {
            let cv = red_f[lid * 16u + j];
            let ci = red_u[lid * 16u + j];
            if (ci != 0xffffffffu && (bi == 0xffffffffu || before(cv, ci, bv, bi))) { bv = cv; bi = ci; }
        }
        red_f[lid * 16u] = bv;
        red_u[lid * 16u] = bi;
    }
    workgroupBarrier();
    var bv = red_f[0];
    var bi = red_u[0];
    for (var j = 1u; j < 16u; j++) {
        let cv = red_f[j * 16u];
        let ci = red_u[j * 16u];
        if (ci != 0xffffffffu && (bi == 0xffffffffu || before(cv, ci, bv, bi))) { bv = cv; bi = ci; }
    }
    workgroupBarrier();
    return vec2<u32>(bitcast<u32>(bv), bi);
}

// Three sums of the workgroup (the third in u32).
fn reduce_sums(lid: u32, a: f32, b: f32, c: u32) -> vec3<f32> {
    red_f[lid] = a;
    red_g[lid] = b;
    red_u[lid] = c;
    workgroupBarrier();
    if (lid < 16u) {
        var sa = 0.0;
        var sb = 0.0;
        var sc = 0u;
        for (var j = 0u; j < 16u; j++) {
            sa = sa + red_f[lid * 16u + j];
            sb = sb + red_g[lid * 16u + j];
            sc = sc + red_u[lid * 16u + j];
        }
        red_f[lid * 16u] = sa;
        red_g[lid * 16u] = sb;
        red_u[lid * 16u] = sc;
    }
    workgroupBarrier();
    var ta = 0.0;
    var tb = 0.0;
    var tc = 0u;
    for (var j = 0u; j < 16u; j++) {
        ta = ta + red_f[j * 16u];
        tb = tb + red_g[j * 16u];
        tc = tc + red_u[j * 16u];
    }
    workgroupBarrier();
    return vec3<f32>(ta, tb, bitcast<f32>(tc));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let sid = wid.x + wid.y * P.groups_x;
    if (sid >= P.samples) { return; }
    let n = sid / P.spatial;
    let sp = sid % P.spatial;
    let base = n * P.classes * P.spatial + sp;
    let y = tgt[sid];

    // pass 1: the scores' maximum, and the logits' first maximum
    var mloc = -3.4e38;
    var bv = -3.4e38;
    var bi = 0xffffffffu;
    for (var c = lid; c < P.classes; c = c + WG) {
        let v = x[base + c * P.spatial];
        mloc = max(mloc, score(v));
        if (bi == 0xffffffffu || before(v, c, bv, bi)) { bv = v; bi = c; }
    }
    let m = reduce_max(lid, mloc);
    let am = reduce_best(lid, bv, bi);

    // pass 2: sums, and the rank of the target
    var xy = 0.0;
    if (y >= 0) { xy = x[base + u32(y) * P.spatial]; }
    var s = 0.0;
    var t = 0.0;
    var above = 0u;
    for (var c = lid; c < P.classes; c = c + WG) {
        let v = x[base + c * P.spatial];
        let d = score(v) - m;
        let e = exp(d);
        s = s + e;
        t = t - e * max(d, D_FLOOR);
        if (y >= 0 && v > xy) { above = above + 1u; }
    }
    let sums = reduce_sums(lid, s, t, above);
    let ssum = sums.x;
    let logs = log(ssum);
    let inv_s = 1.0 / ssum;
    let mu = -sums.y * inv_s;
    if (lid == 0u) {
        let lse = m + logs;
        var lp = 0.0;
        var rank = -1;
        if (y >= 0) {
            lp = (score(xy) - m) - logs;
            rank = i32(bitcast<u32>(sums.z));
        }
        fout[sid * 3u] = lse;
        fout[sid * 3u + 1u] = lp;
        fout[sid * 3u + 2u] = logs + sums.y * inv_s;
        iout[sid * 2u] = i32(am.y);
        iout[sid * 2u + 1u] = rank;
    }

    // top-k: the best class after the previous one, k times
    var pv = 0.0;
    var pi = 0xffffffffu;
    for (var q = 0u; q < P.top_k; q++) {
        var cv = -3.4e38;
        var ci = 0xffffffffu;
        for (var c = lid; c < P.classes; c = c + WG) {
            let v = x[base + c * P.spatial];
            let after_prev = pi == 0xffffffffu || before(pv, pi, v, c);
            if (after_prev && (ci == 0xffffffffu || before(v, c, cv, ci))) { cv = v; ci = c; }
        }
        let best = reduce_best(lid, cv, ci);
        pv = bitcast<f32>(best.x);
        pi = best.y;
        if (lid == 0u) {
            topi[sid * P.top_k + q] = i32(pi);
            topv[sid * P.top_k + q] = (score(pv) - m) - logs;
        }
    }

    if (P.want_grad == 1u) {
        var gl = up[sid * 2u];
        let ge = up[sid * 2u + 1u];
        if (y < 0) { gl = 0.0; }
        let a = ge * mu - gl;
        workgroupBarrier();
        for (var c = lid; c < P.classes; c = c + WG) {
            let i = base + c * P.spatial;
            let v = x[i];
            let d = score(v) - m;
            var g = exp(d) * inv_s * (a - ge * max(d, D_FLOOR));
            if (i32(c) == y) { g = g + gl; }
            x[i] = g * slope(v);
        }
    }
}
