// C[m, n] = (accumulate ? C[m, n] : 0) + sum_k A[m, k] * B[k, n] (+ bias[n])
// over strided views (offsets and strides in elements), so that one kernel
// serves X·Wᵀ, dL·W and dLᵀ·X. 64 x 64 output tile per workgroup of 16 x 16
// threads, each accumulating a 4 x 4 register block; K in steps of 16
// through workgroup memory (8 KiB).

struct MM {
    m: u32, n: u32, k: u32, accumulate: u32,
    a_off: u32, a_rs: u32, a_cs: u32, has_bias: u32,
    b_off: u32, b_rs: u32, b_cs: u32, bias_off: u32,
    c_off: u32, c_rs: u32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> U: MM;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;
var<workgroup> As: array<f32, 1024>;  // [TK][TM]
var<workgroup> Bs: array<f32, 1024>;  // [TK][TN]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let tx = lid3.x;          // along n
    let ty = lid3.y;          // along m
    let lid = ty * 16u + tx;
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    // the 4 x 4 block in registers: row i of it is acc_i (columns in a vec4)
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < U.k; k0 = k0 + TK) {
        // 1024 values of each tile, 4 per thread.
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * 256u;
            let kk = idx / TM;       // 0..15
            let mm = idx % TM;       // 0..63
            let gk = k0 + kk;
            let gm = row0 + mm;
            var av = 0.0;
            if (gk < U.k && gm < U.m) { av = A[U.a_off + gm * U.a_rs + gk * U.a_cs]; }
            As[kk * TM + mm] = av;
            let gn = col0 + mm;
            var bv = 0.0;
            if (gk < U.k && gn < U.n) { bv = B[U.b_off + gk * U.b_rs + gn * U.b_cs]; }
            Bs[kk * TN + mm] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let ar = kk * TM + ty;
            let br = kk * TN + tx;
            let a = vec4<f32>(As[ar], As[ar + 16u], As[ar + 32u], As[ar + 48u]);
            let b = vec4<f32>(Bs[br], Bs[br + 16u], Bs[br + 32u], Bs[br + 48u]);
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }
    let blockv = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + ty + i * 16u;
        if (gm >= U.m) { continue; }
        let rowv = blockv[i];
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + tx + j * 16u;
            if (gn >= U.n) { continue; }
            let ci = U.c_off + gm * U.c_rs + gn;
            var v = rowv[j];
            if (U.has_bias == 1u) { v = v + bias[U.bias_off + gn]; }
            if (U.accumulate == 1u) { v = v + C[ci]; }
            C[ci] = v;
        }
    }
}
