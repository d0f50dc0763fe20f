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
    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) { for (var j = 0u; j < 4u; j++) { acc[i][j] = 0.0; } }

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
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) { a[i] = As[kk * TM + ty + i * 16u]; }
            for (var j = 0u; j < 4u; j++) { b[j] = Bs[kk * TN + tx + j * 16u]; }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) { acc[i][j] = fma(a[i], b[j], acc[i][j]); }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + ty + i * 16u;
        if (gm >= U.m) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + tx + j * 16u;
            if (gn >= U.n) { continue; }
            let ci = U.c_off + gm * U.c_rs + gn;
            var v = acc[i][j];
            if (U.has_bias == 1u) { v = v + bias[U.bias_off + gn]; }
            if (U.accumulate == 1u) { v = v + C[ci]; }
            C[ci] = v;
        }
    }
}
