// quantize_q8a / quantize_q8k on up to 256 values a workgroup holds in shared `qv`, one value per
// invocation (workgroups of 256). Call from every invocation. NaN magnitudes are skipped by the
// largest-magnitude search, as f32::max does.

shared float qv[256];
shared float qa[256];
shared int qc[256];

// Where a block word goes: a buffer by default; an includer may define QSTORE to keep the blocks
// in shared memory instead.
#ifndef QSTORE
#define QSTORE(q, at, val) q.v[at] = (val)
#endif

// qv[0..len) (len a whole number of blocks) into the blocks at word `base` of `q`, block j at
// base + j·BW; `k`: BlockQ8K (256 values, 73 words) else BlockQ8A (32 values, 10 words).
// Each block's largest magnitude (a tree), then one code per invocation, then the packing and
// integer sums.
void quantize_seg(Words q, uint base, uint len, bool k) {
    uint tid = gl_LocalInvocationID.x;
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u;
    uint nb = len / be;
    // Each block's largest magnitude as a tree (max is exact and order-free; NaN counts as 0,
    // which never wins, as in the reference's chain from 0). Magnitudes compare as their bits,
    // denormals included; the tree lives in qc, which is free until the codes.
    float a0 = abs(qv[tid]);
    qc[tid] = tid < len && !isnan(a0) ? int(floatBitsToUint(a0)) : 0;
    barrier();
    for (uint s = be / 2u; s > 0u; s >>= 1) {
        if ((tid % be) < s) qc[tid] = max(qc[tid], qc[tid + s]);
        barrier();
    }
    if (tid < nb) {
        float amax = intBitsToFloat(qc[tid * be]);
        qa[tid] = amax > 0.0 ? div_rn(127.0, amax) : 0.0;
        QSTORE(q, base + tid * bw, floatBitsToUint(amax > 0.0 ? div_rn(amax, 127.0) : 0.0));
    }
    barrier();
    bool live = tid < len;
    precise float p = (live ? qv[tid] : 0.0) * (live ? qa[tid / be] : 0.0);
    int c = isnan(p) ? 0 : int(clamp(roundEven(p), -127.0, 127.0));
    qc[tid] = live ? c : 0;
    barrier();
    uint lb = tid % be;
    if (live) {
        uint at = base + (tid / be) * bw;
        if ((lb & 3u) == 0u) {
            uint word = 0u;
            for (uint j = 0u; j < 4u; j++) word |= (uint(qc[tid + j]) & 0xFFu) << (8u * j);
            QSTORE(q, at + (k ? 1u : 2u) + lb / 4u, word);
        }
        if (!k && lb == 0u) {
            int sum = 0;
            for (uint j = 0u; j < 32u; j++) sum += qc[tid + j];
            QSTORE(q, at + 1u, uint(sum));
        }
        if (k && (lb & 31u) == 0u) {
            int s0 = 0, s1 = 0;
            for (uint j = 0u; j < 16u; j++) {
                s0 += qc[tid + j];
                s1 += qc[tid + 16u + j];
            }
            QSTORE(q, at + 65u + lb / 32u, (uint(s0) & 0xFFFFu) | (uint(s1) << 16));
        }
    }
    barrier();
}

#ifdef QROW
// A whole row held in shared `row[0..dim)` (dim a whole number of blocks; the includer declares
// `row` and defines QROW) into the blocks at word `base` of `q`, in two phases and two barriers
// however long the row. Needs subgroups of at least 8 invocations with shuffles: a block's
// maximum and integer sums are gathered over 8 neighbouring invocations (max and integer adds
// are exact in any order).
shared float qinv[QROW / 32u];

int code_of(float v, float inv) {
    precise float p = v * inv;
    return isnan(p) ? 0 : int(clamp(roundEven(p), -127.0, 127.0));
}

void quantize_row(Words q, uint base, uint dim, bool k) {
    uint tid = gl_LocalInvocationID.x;
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u, nb = dim / be, per = be / 8u;
    // Phase 1: invocation (block, lane) takes the lane's `per` magnitudes (as bits, NaN as 0),
    // the 8 lanes' maximum by shuffles; lane 0 makes the scales.
    for (uint b0 = 0u; b0 < nb; b0 += 32u) {
        uint b = b0 + tid / 8u, lane = tid & 7u, bc = min(b, nb - 1u);
        uint m = 0u;
        for (uint j = 0u; j < per; j++) {
            float a = abs(row[bc * be + lane + 8u * j]);
            m = isnan(a) ? m : max(m, floatBitsToUint(a));
        }
        m = max(m, subgroupShuffleXor(m, 1u));
        m = max(m, subgroupShuffleXor(m, 2u));
        m = max(m, subgroupShuffleXor(m, 4u));
        if (lane == 0u && b < nb) {
            float amax = uintBitsToFloat(m);
            qinv[b] = amax > 0.0 ? div_rn(127.0, amax) : 0.0;
            QSTORE(q, base + b * bw, floatBitsToUint(amax > 0.0 ? div_rn(amax, 127.0) : 0.0));
        }
    }
    barrier();
    // Phase 2: invocation per code word (4 codes); a block's 8 (Q8A) or a half sub-block's 4
    // (Q8K) neighbouring words add their sums by shuffles.
    uint words = dim / 4u;
    for (uint w0 = 0u; w0 < words; w0 += 256u) {
        uint wi = w0 + tid, wc = min(wi, words - 1u), e = 4u * wc, b = e / be, lb = e % be;
        float inv = qinv[b];
        uint word = 0u;
        int s = 0;
        for (uint j = 0u; j < 4u; j++) {
            int c = code_of(row[e + j], inv);
            word |= (uint(c) & 0xFFu) << (8u * j);
            s += c;
        }
        bool live = wi < words;
        if (live) QSTORE(q, base + b * bw + (k ? 1u : 2u) + lb / 4u, word);
        s += subgroupShuffleXor(s, 1u);
        s += subgroupShuffleXor(s, 2u);
        if (k) {
            // Words 8g..8g+3 hold sub-block g's first 16 codes, 8g+4..8g+7 its last 16.
            int s1 = subgroupShuffleXor(s, 4u);
            if (live && (wc & 7u) == 0u) QSTORE(q, base + b * bw + 65u + lb / 32u, (uint(s) & 0xFFFFu) | (uint(s1) << 16));
        } else {
            s += subgroupShuffleXor(s, 4u);
            if (live && (wc & 7u) == 0u) QSTORE(q, base + b * bw + 1u, uint(s));
        }
    }
    barrier();
}
#endif
