// Subgroup shuffles of the monoids (only compiled when the adapter has Features::SUBGROUP).

fn shuffle_xor_Acc(a: Acc, mask: u32) -> Acc {
    return Acc(subgroupShuffleXor(a.main_hi, mask), subgroupShuffleXor(a.main_lo, mask),
               subgroupShuffleXor(a.resid_hi, mask), subgroupShuffleXor(a.resid_lo, mask),
               subgroupShuffleXor(a.flags, mask), subgroupShuffleXor(a.tiny_p, mask),
               subgroupShuffleXor(a.tiny_q, mask));
}

fn shuffle_xor_Lse(a: Lse, mask: u32) -> Lse {
    return Lse(subgroupShuffleXor(a.p_m, mask), subgroupShuffleXor(a.p_s, mask),
               subgroupShuffleXor(a.p_i, mask), subgroupShuffleXor(a.q_m, mask),
               subgroupShuffleXor(a.q_s, mask), subgroupShuffleXor(a.q_i, mask));
}

fn shuffle_xor_Soft(a: Soft, mask: u32) -> Soft {
    return Soft(subgroupShuffleXor(a.xm, mask), subgroupShuffleXor(a.xs, mask),
                subgroupShuffleXor(a.xi, mask), subgroupShuffleXor(a.ym, mask),
                subgroupShuffleXor(a.ys, mask), subgroupShuffleXor(a.yi, mask),
                subgroupShuffleXor(a.t, mask), subgroupShuffleXor(a.flags, mask));
}

fn shuffle_xor_Rel(a: Rel, mask: u32) -> Rel {
    return Rel(subgroupShuffleXor(a.xm, mask), subgroupShuffleXor(a.w, mask),
               subgroupShuffleXor(a.xi, mask), subgroupShuffleXor(a.c, mask),
               subgroupShuffleXor(a.f, mask), subgroupShuffleXor(a.g, mask),
               subgroupShuffleXor(a.b, mask), subgroupShuffleXor(a.ba, mask),
               subgroupShuffleXor(a.q, mask), subgroupShuffleXor(a.ym, mask),
               subgroupShuffleXor(a.yi, mask),
               subgroupShuffleXor(a.flags, mask));
}

fn shuffle_xor_Norm(a: Norm, mask: u32) -> Norm {
    return Norm(subgroupShuffleXor(a.sp_hi, mask), subgroupShuffleXor(a.sp_lo, mask),
                subgroupShuffleXor(a.sq_hi, mask), subgroupShuffleXor(a.sq_lo, mask),
                subgroupShuffleXor(a.t_hi, mask), subgroupShuffleXor(a.t_lo, mask),
                subgroupShuffleXor(a.w_hi, mask), subgroupShuffleXor(a.w_lo, mask),
                subgroupShuffleXor(a.tiny_p, mask), subgroupShuffleXor(a.tiny_q, mask),
                subgroupShuffleXor(a.flags, mask));
}
