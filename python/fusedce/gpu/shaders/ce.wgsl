// Fused softmax cross-entropy: one workgroup per sample (a row of (N, C), or a
// spatial position of (N, C, d1..dK), whose classes are `spatial` apart).
//
// Pass 1 reduces, per thread then across the workgroup, the running maximum m,
// s = sum exp(x - m), b = sum tw and a = sum tw * (x - m), where tw is the
// class's target weight (class weight times the smoothed one-hot or
// probability target). loss = b * log(s) - a. Pass 2 writes the gradient
// scale * (softmax * b - tw) over the logits.
//
// The host substitutes STORAGE: `f32`, or `f16` (with `enable f16;` first,
// on adapters with shader-f16) for half-precision logits and probabilities,
// which are widened to f32 on load; all arithmetic is f32.
//ENABLE
alias S = STORAGE;

struct Params {
    samples: u32,
    classes: u32,
    spatial: u32,
    probs: u32,        // 1: probability targets in `prob`
    eps: f32,          // label smoothing
    want_grad: u32,
    groups_x: u32,     // workgroups along x of the 2-D dispatch
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> x: array<S>;
@group(0) @binding(2) var<storage, read> tgt: array<i32>;     // class per sample; -1 = ignored
@group(0) @binding(3) var<storage, read> prob: array<S>;      // (N, C, S) probabilities, or a dummy
@group(0) @binding(4) var<storage, read> cw: array<f32>;      // (C) class weights
@group(0) @binding(5) var<storage, read> scale: array<f32>;   // upstream gradient per sample
@group(0) @binding(6) var<storage, read_write> loss: array<f32>;

const WG: u32 = 256u;
var<workgroup> sm: array<f32, 256>;
var<workgroup> ss: array<f32, 256>;
var<workgroup> sa: array<f32, 256>;
var<workgroup> sb: array<f32, 256>;

struct Acc { m: f32, s: f32, a: f32, b: f32, }

fn merge(p: Acc, q: Acc) -> Acc {
    if (q.s == 0.0 && q.b == 0.0 && q.m == -3.0e38) { return p; }
    if (p.s == 0.0 && p.b == 0.0 && p.m == -3.0e38) { return q; }
    let m = max(p.m, q.m);
    var r: Acc;
    r.m = m;
    r.s = p.s * exp(p.m - m) + q.s * exp(q.m - m);
    r.a = p.a - p.b * (m - p.m) + q.a - q.b * (m - q.m);
    r.b = p.b + q.b;
    return r;
}

fn target_weight(c: u32, y: i32, base: u32) -> f32 {
    let C = f32(P.classes);
    if (P.probs == 1u) {
        let t = f32(prob[base + c * P.spatial]);
        return cw[c] * (t * (1.0 - P.eps) + P.eps / C);
    }
    var tw = cw[c] * P.eps / C;
    if (i32(c) == y) { tw = tw + cw[c] * (1.0 - P.eps); }
    return tw;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let sid = wid.x + wid.y * P.groups_x;
    if (sid >= P.samples) { return; }
    let n = sid / P.spatial;
    let sp = sid % P.spatial;
    let base = n * P.classes * P.spatial + sp;
    let y = tgt[sid];
    let ignored = P.probs == 0u && y < 0;

    var acc = Acc(-3.0e38, 0.0, 0.0, 0.0);
    if (!ignored) {
        for (var c = lid; c < P.classes; c = c + WG) {
            let v = f32(x[base + c * P.spatial]);
            let tw = target_weight(c, y, base);
            var one = Acc(v, 1.0, 0.0, tw);
            acc = merge(acc, one);
        }
    }
    sm[lid] = acc.m; ss[lid] = acc.s; sa[lid] = acc.a; sb[lid] = acc.b;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid < off) {
            let r = merge(Acc(sm[lid], ss[lid], sa[lid], sb[lid]),
                          Acc(sm[lid + off], ss[lid + off], sa[lid + off], sb[lid + off]));
            sm[lid] = r.m; ss[lid] = r.s; sa[lid] = r.a; sb[lid] = r.b;
        }
        workgroupBarrier();
    }
    let m = sm[0];
    let inv_s = 1.0 / ss[0];
    let logs = log(ss[0]);
    let a = sa[0];
    let b = sb[0];
    if (lid == 0u) {
        loss[sid] = select(b * logs - a, 0.0, ignored);
    }
    if (P.want_grad == 1u) {
        let g = scale[sid];
        for (var c = lid; c < P.classes; c = c + WG) {
            let i = base + c * P.spatial;
            if (ignored) {
                x[i] = S(0.0);
            } else {
                // exp(x - m) / s, not exp(x - (m + log s)): m + log s
                // would round at the scale of m (1e4 logits lose 1e-4).
                let p = exp(f32(x[i]) - m) * inv_s;
                x[i] = S(g * (p * b - target_weight(c, y, base)));
            }
        }
    }
}
