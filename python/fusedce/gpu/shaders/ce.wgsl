// Fused softmax cross-entropy: one workgroup per sample (a row of (N, C), or a
// spatial position of (N, C, d1..dK), whose classes are `spatial` apart).
//
// Pass 1: the row's maximum m (a workgroup max-reduction). Pass 2: s = sum
// exp(x - m), b = sum tw and a = sum tw * (x - m), where tw is the class's
// target weight (class weight times the smoothed one-hot or probability
// target); loss = b * log(s) - a. As in the CPU kernels, for a class target
// the sums hold only the smoothing part (none without smoothing) and the
// target's own term is added once after the reduction, so a -inf logit on
// another class (a masked vocabulary entry) contributes nothing. Pass 3
// writes the gradient scale * (softmax * b - tw) over the logits (an
// ignored sample: scale 0, so only a NaN in its row shows, as in PyTorch).
// One exp per element in each pass that needs one; the row is re-read from
// memory (or cache) each pass.
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
var<workgroup> red_m: array<f32, 256>;
var<workgroup> red_s: array<f32, 256>;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

// The target weight of class c without the one-hot part of a class target.
fn spread_weight(c: u32, base: u32) -> f32 {
    let C = f32(P.classes);
    if (P.probs == 1u) {
        let t = f32(prob[base + c * P.spatial]);
        return cw[c] * (t * (1.0 - P.eps) + P.eps / C);
    }
    if (P.eps > 0.0) { return cw[c] * P.eps / C; }
    return 0.0;
}

fn target_weight(c: u32, y: i32, base: u32) -> f32 {
    var tw = spread_weight(c, base);
    if (P.probs == 0u && i32(c) == y) { tw = tw + cw[c] * (1.0 - P.eps); }
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

    // pass 1: maximum
    var mloc = -3.4e38;
    for (var c = lid; c < P.classes; c = c + WG) {
        mloc = max(mloc, f32(x[base + c * P.spatial]));
    }
    // two-level reductions (16 x 16): 3 barriers rather than log2(256) + 1,
    // which matters where barriers are expensive (CPU-emulated adapters)
    red_m[lid] = mloc;
    workgroupBarrier();
    if (lid < 16u) {
        var v = red_m[lid * 16u];
        for (var j = 1u; j < 16u; j++) { v = max(v, red_m[lid * 16u + j]); }
        red_m[lid * 16u] = v;
    }
    workgroupBarrier();
    var m = red_m[0];
    for (var j = 1u; j < 16u; j++) { m = max(m, red_m[j * 16u]); }

    // pass 2: sums relative to m
    var s = 0.0;
    var a = 0.0;
    var b = 0.0;
    let spread = P.probs == 1u || P.eps > 0.0;
    for (var c = lid; c < P.classes; c = c + WG) {
        let v = f32(x[base + c * P.spatial]) - m;
        s = s + exp(v);
        if (spread) {
            let tw = spread_weight(c, base);
            a = a + tw * v;
            b = b + tw;
        }
    }
    red_s[lid] = s;
    red_a[lid] = a;
    red_b[lid] = b;
    workgroupBarrier();
    if (lid < 16u) {
        var vs = 0.0;
        var va = 0.0;
        var vb = 0.0;
        for (var j = 0u; j < 16u; j++) {
            vs = vs + red_s[lid * 16u + j];
            va = va + red_a[lid * 16u + j];
            vb = vb + red_b[lid * 16u + j];
        }
        red_s[lid * 16u] = vs;
        red_a[lid * 16u] = va;
        red_b[lid * 16u] = vb;
    }
    workgroupBarrier();
    var ssum = 0.0;
    var sa = 0.0;
    var sb = 0.0;
    for (var j = 0u; j < 16u; j++) {
        ssum = ssum + red_s[j * 16u];
        sa = sa + red_a[j * 16u];
        sb = sb + red_b[j * 16u];
    }
    if (P.probs == 0u && !ignored) {
        // the target's own term, read before pass 3 overwrites the logits
        let keep = cw[u32(y)] * (1.0 - P.eps);
        sa = sa + keep * (f32(x[base + u32(y) * P.spatial]) - m);
        sb = sb + keep;
    }
    if (ignored) { sb = 0.0; }
    let inv_s = 1.0 / ssum;
    let logs = log(ssum);
    workgroupBarrier();
    if (lid == 0u) {
        loss[sid] = select(sb * logs - sa, 0.0, ignored);
    }
    if (P.want_grad == 1u) {
        let g = select(scale[sid], 0.0, ignored);
        for (var c = lid; c < P.classes; c = c + WG) {
            let i = base + c * P.spatial;
            // exp(x - m) / s, not exp(x - (m + log s)): m + log s
            // would round at the scale of m (1e4 logits lose 1e-4).
            let p = exp(f32(x[i]) - m) * inv_s;
            x[i] = S(g * (p * sb - target_weight(c, y, base)));
        }
    }
}
