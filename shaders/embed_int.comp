#version 460
// Embed from a compressed-tensors integer table: out[t, :] = dequantize_int_row(table[tokens[t]]) · scale.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/int.glsl"

layout(local_size_x = 256) in;
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
    uint tokens_off;  // word offset of the token ids in the step buffer
    float scale;
    uint group;
    uint groups;
    uint iflags;
} pc;

void main() {
    uint j = gl_GlobalInvocationID.x, t = gl_WorkGroupID.y;
    if (j >= pc.cols || t >= pc.rows) return;
    uint token = Words(pc.step).v[pc.tokens_off + t];
    float v = int_deq(Words(pc.table), pc.t_byte + token * pc.row_bytes, Words(pc.scales), Words(pc.zeros), token, j,
                      pc.group, pc.groups, pc.iflags);
    precise float r = v * pc.scale;
    Floats(pc.out_).v[pc.out_off + t * pc.cols + j] = r;
}
