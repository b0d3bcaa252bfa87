// The matmul push constants (hal-vulkan MmPush), shared by mm.glsl and mm_tile.comp.
layout(push_constant) uniform Push {
    uvec2 w;          // weight buffer
    uvec2 x;          // activations: f32 rows, or quantized blocks (Q8A/Q8K words)
    uvec2 out_;       // f32 output
    uint w_byte;      // byte offset of weight row 0
    uint x_off;       // word offset of token 0's activations
    uint out_off;     // element offset of out[0, 0]
    uint rows;        // weight rows (output features)
    uint cols;        // weight columns
    uint n;           // tokens
    uint row_bytes;   // bytes of one weight row
    uint x_stride;    // words per token of x
#ifdef MM_PUSH_EXTRA
    MM_PUSH_EXTRA     // an includer's own fields after the common ones
#endif
} pc;
