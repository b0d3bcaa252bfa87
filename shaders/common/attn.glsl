// Shared by the attention kernels: their push constants (hal-vulkan AttnPush) and the score
// of a key from its 8 lane chains.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require

layout(push_constant) uniform Push {
    uvec2 out_;
    uvec2 q;
    uvec2 k;
    uvec2 v;
    uvec2 step;
    uint out_off;
    uint q_off;
    uint k_off;
    uint v_off;
    uint heads;
    uint kv_heads;
    uint head_dim;
    uint window;
    uint row_seq_off;
    uint seqs_off;
    float scale;
    float softcap;
    uvec2 qout;       // with qmode: the output quantized too (the QuantizeAct that follows)
    uint qout_off;
    uint qmode;       // 0 none, 1 BlockQ8A, 2 BlockQ8K; needs head_dim ≤ 256, whole blocks
    uint rows;        // rows of the step (attention_blk: its last block may be partial)
    uint ring;        // rows a slot of a ring cache (position p at ring_row + p % ring); 0: linear
} pc;

// The cache rows of a sequence's keys from position `first` on: key j (j < ring) of the range is
// at row kv_base + kv_wrap(kv_r0 + j). A linear cache never wraps.
uint kv_base, kv_r0, kv_len;

// Set the key addressing for the sequence whose span starts at step word `span`.
void kv_rows(Words st, uint span, uint first) {
    bool ring = pc.ring != 0u;
    kv_base = ring ? st.v[span + 4u] : st.v[span + 2u];
    kv_r0 = ring ? first % pc.ring : first;
    kv_len = ring ? pc.ring : 0xFFFFFFFFu;
}

// The cache row of key j of the range (relative to the cache's row 0).
uint kv_row(uint j) {
    uint r = kv_r0 + j;
    return kv_base + (r >= kv_len ? r - kv_len : r);
}

// The whole score from the 8 lanes (gathered by shuffles from lane 0's point of view; moves
// only): reduce_lanes, · scale, then the softcap. Valid in lane 0 of each group of 8.
float score_of(float acc) {
    uint me = gl_SubgroupInvocationID;
    float l1 = subgroupShuffle(acc, me + 1u), l2 = subgroupShuffle(acc, me + 2u), l3 = subgroupShuffle(acc, me + 3u);
    float l4 = subgroupShuffle(acc, me + 4u), l5 = subgroupShuffle(acc, me + 5u), l6 = subgroupShuffle(acc, me + 6u);
    float l7 = subgroupShuffle(acc, me + 7u);
    precise float s = reduce_lanes(acc, l1, l2, l3, l4, l5, l6, l7) * pc.scale;
    return pc.softcap > 0.0 ? softcap_ref(s, pc.softcap) : s;
}

