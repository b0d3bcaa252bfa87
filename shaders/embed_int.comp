#version 460
// Embed from a compressed-tensors integer table: out[t, :] = dequantize_int_row(table[tokens[t]]) · scale.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/int.glsl"

layout(local_size_x = 256) in;
// 1: EmbedIds, the ids are f32 indices in a buffer (see embed_token).
layout(constant_id = 0) const uint IDS = 0;
layout(push_constant) uniform Push {
    uvec2 table;      // codes
    uvec2 out_;
    uvec2 step;
    uvec2 scales;
    uvec2 zeros;
    uint t_byte;      // byte offset of table row 0
    uint row_bytes;
    uint cols;
    uint rows;        // step rows
    uint out_off;
    uint tokens_off;  // word offset of the token ids in the step buffer (IDS: in `step`, the ids buffer)
    float scale;
    uint group;
    uint groups;
    uint iflags;
    uint vocab;       // table rows (IDS clamps to them)
} pc;

void main() {
    uint j = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    if (j >= pc.cols || t >= pc.rows) return;
    uint token = embed_token(pc.step, pc.tokens_off + t, IDS == 1u, pc.vocab);
    float v = int_deq(Words(pc.table), pc.t_byte + token * pc.row_bytes, Words(pc.scales), Words(pc.zeros), token, j,
                      pc.group, pc.groups, pc.iflags);
    precise float r = v * pc.scale;
    Floats(pc.out_).v[pc.out_off + t * pc.cols + j] = r;
}
