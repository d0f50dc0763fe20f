// out[j] += sum over rows r of L[r * cols + j], rows in order (deterministic).
struct CS { rows: u32, cols: u32, _p0: u32, _p1: u32, }
@group(0) @binding(0) var<uniform> U: CS;
@group(0) @binding(1) var<storage, read> L: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let j = gid.x + gid.y * nw.x * 256u;
    if (j >= U.cols) { return; }
    var s = 0.0;
    for (var r = 0u; r < U.rows; r++) { s = s + L[r * U.cols + j]; }
    out[j] = out[j] + s;
}
