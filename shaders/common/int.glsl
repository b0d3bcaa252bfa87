// compressed-tensors integer weights (purehw_kernels::quant::packed), element by element:
// w = (code − zero point)·scale, the integer exact and the product rounded once, as the
// reference computes it. Codes are a row's bytes; scales are [rows, groups]; zero points are
// packed down the rows, 32/bits of them per 32-bit word, [rows / (32/bits), groups] words.

#define INT_4BIT 1u          // 4-bit codes (else 8-bit)
#define INT_I8 2u            // int-quantized: two's-complement bytes (else offset by 2^(bits−1))
#define INT_ASYM 4u          // zero points present
#define INT_SCALE_F16 8u
#define INT_SCALE_BF16 16u   // (neither: f32 scales)

// Code j of a whole code word: the j-th nibble (4-bit, j < 8) or byte (8-bit, j < 4).
int word_code(uint word, uint j, bool four, bool i8) {
    if (four) return int((word >> (4u * j)) & 15u) - 8;
    return i8 ? sbyte(word, j) : int((word >> (8u * j)) & 255u) - 128;
}

// Code j of a row: its byte read alone, decoded as a one-byte word.
int int_code(Words w, uint row_byte, uint j, uint flags) {
    bool four = (flags & INT_4BIT) != 0u;
    uint b = ld_u8(w, row_byte + (four ? j / 2u : j));
    return word_code(b, four ? j & 1u : 0u, four, (flags & INT_I8) != 0u);
}

float int_scale(Words s, uint i, uint flags) {
    if ((flags & INT_SCALE_F16) != 0u) return f16_to_f32(ld_u16(s, 2u * i));
    if ((flags & INT_SCALE_BF16) != 0u) return bf16_to_f32(ld_u16(s, 2u * i));
    return uintBitsToFloat(s.v[i]);
}

int int_zero(Words z, uint row, uint g, uint groups, uint flags) {
    if ((flags & INT_ASYM) == 0u) return 0;
    bool four = (flags & INT_4BIT) != 0u;
    uint k = four ? 8u : 4u, field = row % k;
    uint b = ld_u8(z, ((row / k) * groups + g) * 4u + (four ? field / 2u : field));
    return four ? int((b >> (4u * (field & 1u))) & 15u) - 8 : int(b) - 128;
}

// Element j of weight row `row` (its codes at byte `row_byte` of `w`).
float int_deq(Words w, uint row_byte, Words s, Words z, uint row, uint j, uint group, uint groups, uint flags) {
    uint g = j / group;
    int q = int_code(w, row_byte, j, flags) - int_zero(z, row, g, groups, flags);
    precise float v = float(q) * int_scale(s, row * groups + g, flags);
    return v;
}
