#version 460
// variants: FMT=F32|F16|BF16|Q4_0|Q4_1|Q5_0|Q5_1|Q8_0|Q4_K|Q5_K|Q6_K
// Embed: out[t, :] = dequantize(table[tokens[t], :]) · scale.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/quant.glsl"

layout(local_size_x = 256) in;
// 1: EmbedIds, the ids are f32 indices in a buffer (see embed_token).
layout(constant_id = 0) const uint IDS = 0;
layout(push_constant) uniform Push {
    uvec2 table;
    uvec2 out_;
    uvec2 step;
    uint t_byte;      // byte offset of table row 0
    uint row_bytes;
    uint cols;
    uint rows;        // step rows
    uint out_off;
    uint tokens_off;  // word offset of the token ids in the step buffer (IDS: in `step`, the ids buffer)
    float scale;
    uint vocab;       // table rows (IDS clamps to them)
} pc;

void main() {
    uint j = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    if (j >= pc.cols || t >= pc.rows) return;
    uint token = embed_token(pc.step, pc.tokens_off + t, IDS == 1u, pc.vocab);
    uint b = j / BLOCK_ELEMS;
    float v = deq(Words(pc.table), pc.t_byte + token * pc.row_bytes + b * BLOCK_BYTES, j - b * BLOCK_ELEMS);
    precise float r = v * pc.scale;
    Floats(pc.out_).v[pc.out_off + t * pc.cols + j] = r;
}
