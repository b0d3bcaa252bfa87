#version 460
// StoreKv: each sequence's new rows of src into its cache slot: position p = pos0 + i at row
// cache_row + p, or ring_row + p % ring in a ring cache (ring > 0).
#include "common/base.glsl"

layout(local_size_x = 256) in;
// The cache's elements: 0 f32, 1 f16 (two a word; invocation e stores elements 2e and 2e + 1).
layout(constant_id = 0) const uint KV16 = 0;
layout(push_constant) uniform Push {
    uvec2 cache;
    uvec2 src;
    uvec2 step;
    uint cache_off;
    uint src_off;
    uint width;
    uint rows;
    uint row_seq_off;   // step words: the sequence of each row (~0u: none)
    uint seqs_off;      // step words: (row, len, cache_row, pos0, ring_row) per sequence
    uint ring;          // rows a slot of a ring cache; 0: linear
} pc;

#include "common/kv.glsl"

void main() {
    uint e = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    if ((KV16 == 0u ? e : 2u * e) >= pc.width || t >= pc.rows) return;
    Words st = Words(pc.step);
    uint s = st.v[pc.row_seq_off + t];
    if (s == 0xFFFFFFFFu) return;
    uint srow = st.v[pc.seqs_off + 5u * s], cache_row = st.v[pc.seqs_off + 5u * s + 2u];
    uint pos0 = st.v[pc.seqs_off + 5u * s + 3u], ring_row = st.v[pc.seqs_off + 5u * s + 4u];
    uint p = pos0 + (t - srow);
    uint dst = pc.ring == 0u ? cache_row + p : ring_row + p % pc.ring;
    Floats src = Floats(pc.src);
    if (KV16 == 0u) {
        Floats(pc.cache).v[pc.cache_off + dst * pc.width + e] = src.v[pc.src_off + t * pc.width + e];
    } else {
        uint a = f32_to_f16(src.v[pc.src_off + t * pc.width + 2u * e]);
        uint b = f32_to_f16(src.v[pc.src_off + t * pc.width + 2u * e + 1u]);
        Words(pc.cache).v[pc.cache_off + dst * pc.width / 2u + e] = a | (b << 16);
    }
}
