// Shared by the matmul kernels: out[t, r] = Σ_c w[r, c]·x[t, c] for a tile of WG/8 rows × TOKENS
// tokens per workgroup. Thread (row, lane) owns lane `lane` of the reference's
// 8-lane accumulation (purehw_kernels::quant) for its row and every token of the tile, walking
// the blocks in order, so each lane's chain of float additions is the reference's own. The 8
// lanes of a row are 8 neighbouring invocations of one subgroup (subgroups are at least 8 wide
// here): lane 0 gathers the others' values by shuffles — moves, no arithmetic — and combines
// them in reduce_lanes' order.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require

layout(constant_id = 0) const uint TOKENS = 16;
// Threads per workgroup (8 per row): 256, or 64 for small matrices (more workgroups in flight).
layout(constant_id = 1) const uint WG = 256;
layout(local_size_x_id = 1) in;
const uint ROWS = WG / 8u;

#include "common/mm_push.glsl"

// Lane 0 of each row gathers its 8 lanes and writes reduce_lanes(acc) + off per token.
void finish(uint r, uint lane, uint t0, uint nt, float acc[TOKENS], float off[TOKENS]) {
    uint me = gl_SubgroupInvocationID;
    Floats o = Floats(pc.out_);
    [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
        float l1 = subgroupShuffle(acc[t], me + 1u);
        float l2 = subgroupShuffle(acc[t], me + 2u);
        float l3 = subgroupShuffle(acc[t], me + 3u);
        float l4 = subgroupShuffle(acc[t], me + 4u);
        float l5 = subgroupShuffle(acc[t], me + 5u);
        float l6 = subgroupShuffle(acc[t], me + 6u);
        float l7 = subgroupShuffle(acc[t], me + 7u);
        if (lane == 0u && t < nt && r < pc.rows) {
            precise float s = reduce_lanes(acc[t], l1, l2, l3, l4, l5, l6, l7);
            precise float res = s + off[t];
            o.v[pc.out_off + (t0 + t) * pc.rows + r] = res;
        }
    }
}
