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
    uint pad_;
} pc;

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

