/*
 * qtest: the checking harness.  Every target call goes through
 * qtest_tramp (entry.S), which loads canaries into the callee-saved
 * registers and records rsp, those registers and rflags around the call.
 * Each chk_*() makes exactly one call to its target (argument case chosen
 * by the iteration number) and checks the result against a C model plus
 * the target's side effects.
 */
#include "qtest.h"

struct trec {
	u64 rsp_before, rsp_after;
	u64 rbx, rbp, r12, r13, r14, r15;
	u64 rflags_before, rflags_after;
	u64 rax, rdx;
};
STATIC_ASSERT(__builtin_offsetof(struct trec, rbx) == TREC_RBX);
STATIC_ASSERT(__builtin_offsetof(struct trec, rflags_before) == TREC_RFLAGS_BEFORE);
STATIC_ASSERT(__builtin_offsetof(struct trec, rdx) == TREC_RDX);
STATIC_ASSERT(__builtin_offsetof(struct qtest_cpu, gs_counter) == PCPU_GS_COUNTER);
STATIC_ASSERT(__builtin_offsetof(struct qtest_cpu, trec) == PCPU_TREC);
STATIC_ASSERT(__builtin_offsetof(struct qtest_cpu, step_active) == PCPU_STEP_ACTIVE);
STATIC_ASSERT(__builtin_offsetof(struct qtest_cpu, bp_count) == PCPU_BP_COUNT);
STATIC_ASSERT(__builtin_offsetof(struct qtest_cpu, pf_rip) == PCPU_PF_RIP);
STATIC_ASSERT(__builtin_offsetof(struct qtest_cpu, apic_id) == PCPU_APIC_ID);
STATIC_ASSERT(sizeof(struct tss) == 104);

u64 qtest_calls[QTEST_NTARGETS] __attribute__((aligned(64)));

extern u64 qtest_tramp(u64 fn, u64 a0, u64 a1, u64 a2, u64 a3, struct trec *rec);
extern u64 t_hot(u64);
extern u64 qt_store_val, qt_acc;
extern u32 qt_store32, qt_cmp_word;
extern u16 qt_w16;
extern u8 qt_b;

static int fail(struct ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct ctx *c, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	kvsnprintf(c->why, sizeof(c->why), fmt, ap);
	va_end(ap);
	return -1;
}

/* call target idx through the trampoline and check the ABI invariants */
static int tcall(struct ctx *c, int idx, u64 a0, u64 a1, u64 a2, u64 a3, struct trec *r)
{
	qtest_tramp(qtest_targets[idx].addr, a0, a1, a2, a3, r);
	if (r->rsp_after != r->rsp_before)
		return fail(c, "rsp changed: 0x%lx -> 0x%lx", r->rsp_before, r->rsp_after);
	static const struct { const char *n; u64 want; int off; } regs[] = {
		{ "rbx", CANARY_RBX, 0 }, { "rbp", CANARY_RBP, 1 }, { "r12", CANARY_R12, 2 },
		{ "r13", CANARY_R13, 3 }, { "r14", CANARY_R14, 4 }, { "r15", CANARY_R15, 5 },
	};
	const u64 *got = &r->rbx;
	for (unsigned i = 0; i < ARRAY_SIZE(regs); i++)
		if (got[regs[i].off] != regs[i].want)
			return fail(c, "%s clobbered: 0x%lx", regs[i].n, got[regs[i].off]);
	if ((r->rflags_after ^ r->rflags_before) & X86_IF)
		return fail(c, "IF changed across the call: rflags 0x%lx -> 0x%lx",
			    r->rflags_before, r->rflags_after);
	if (r->rflags_after & (X86_TF | X86_DF | X86_AC))
		return fail(c, "rflags after the call has TF/DF/AC: 0x%lx", r->rflags_after);
	return 0;
}

#define CALL(idx, a0, a1, a2, a3)                                   \
	do {                                                        \
		if (tcall(c, idx, a0, a1, a2, a3, &r))              \
			return -1;                                  \
	} while (0)

#define EXPECT_NAMED(what, got, want)                                               \
	do {                                                                         \
		u64 g_ = (got), w_ = (want);                                         \
		if (g_ != w_)                                                        \
			return fail(c, "%s = 0x%lx, expected 0x%lx (args 0x%lx 0x%lx)",     \
				    what, g_, w_, a0, a1);                               \
	} while (0)
#define EXPECT(got, want) EXPECT_NAMED(#got, got, want)
#define EXPECT_RESULT(want) EXPECT_NAMED("result", r.rax, want)

static const u64 vals[] = {
	0, 1, 2, 3, 0x12345, 0x7fffffffffffffff, 0x8000000000000000, ~0UL,
	0x5a, 0xdeadbeefcafe, 0xfffffffffffffffe, 0x80000000, 0x1234567890abcdef,
	0x100, 7, 0x80,
};
#define V(i) vals[(i) % ARRAY_SIZE(vals)]

static int chk_riprel_load(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	u64 v = 0x1122334455667788, v2 = 0x0f0e0d0c0b0a0908;
	CALL(T_RIPREL_LOAD, a0, 0, 0, 0);
	EXPECT_RESULT(((v + a0) ^ v2) + ((v >> 8) & 0xff));
	return 0;
}

static int chk_riprel_store(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i) ^ (i << 32), a1 = 0;
	u64 old = READ_ONCE(qt_store_val);
	CALL(T_RIPREL_STORE, a0, 0, 0, 0);
	EXPECT_RESULT(old);
	EXPECT(qt_store_val, a0);
	EXPECT(qt_store32, (u32)a0);
	return 0;
}

static int chk_riprel_cmp_imm(struct ctx *c, u64 i)
{
	struct trec r;
	static const u64 xs[] = { 0x12345, 0, 0x80012345, 0x12346, 0xffffffff, 0x12345 };
	static const u64 ys[] = { 0x5a, 0x15a, 0x5a, 0, 0x5a5a, 0x5b };
	u64 a0 = xs[i % ARRAY_SIZE(xs)], a1 = ys[i % ARRAY_SIZE(ys)];
	u64 acc = READ_ONCE(qt_acc);
	WRITE_ONCE(qt_w16, 0);
	CALL(T_RIPREL_CMP_IMM, a0, a1, 0, 0);
	u32 x = (u32)a0;
	u64 want = (x == 0x12345) | (((u8)a1 == 0x5a) << 1) | (((x >> 31) & 1) << 2) |
		   ((u64)(u32)(3 * x) << 8);
	EXPECT_RESULT(want);
	EXPECT(qt_acc, acc + 7);
	EXPECT(qt_w16, 0x1234);
	EXPECT(qt_b, (u8)a1);
	EXPECT(qt_cmp_word, x);
	return 0;
}

static int chk_riprel_gs(struct ctx *c, u64 i)
{
	struct trec r;
	struct qtest_cpu *me = this_cpu();
	u64 a0 = V(i), a1 = 0;
	u32 cnt = me->gs_counter;
	u64 sum = me->gs_sum, aux = me->gs_aux;
	CALL(T_RIPREL_GS, a0, 0, 0, 0);
	EXPECT_RESULT((u32)(cnt + 1));
	EXPECT(me->gs_counter, (u32)(cnt + 1));
	EXPECT(me->gs_sum, sum + a0);
	EXPECT(me->gs_aux, aux + 3);
	/* the template is never the live area: a lost %gs prefix lands here */
	EXPECT(qtest_percpu.gs_counter, 0);
	EXPECT(qtest_percpu.gs_sum, 0);
	EXPECT(qtest_percpu.gs_aux, 0);
	return 0;
}

static int chk_pushf(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = i & 1, a1 = 0;
	const u64 arith = X86_CF | X86_PF | X86_AF | X86_ZF | X86_SF | X86_OF;
	if (a0) {
		/* with interrupts disabled by the caller */
		cli();
		int e = tcall(c, T_PUSHF, 0, 0, 0, 0, &r);
		sti();
		if (e)
			return e;
		if (r.rax & X86_IF)
			return fail(c, "pushf saw IF=1 with interrupts disabled: 0x%lx", r.rax);
	} else {
		CALL(T_PUSHF, 0, 0, 0, 0);
		if (!(r.rax & X86_IF))
			return fail(c, "pushf saw IF=0 with interrupts enabled: 0x%lx", r.rax);
	}
	if (r.rax & X86_TF)
		return fail(c, "pushf saw TF=1: 0x%lx", r.rax);
	if (!(r.rax & 2))
		return fail(c, "pushf image lacks reserved bit 1: 0x%lx", r.rax);
	EXPECT(r.rax & ~arith, r.rflags_before & ~arith);
	return 0;
}

static int chk_popf(struct ctx *c, u64 i)
{
	struct trec r;
	static const u64 fl[] = {
		0x002,			/* IF=0, all clear */
		0x203,			/* IF, CF */
		0x6d6,			/* DF, IF, SF, ZF, AF, PF */
		0x8d7,			/* OF SF ZF AF PF CF, IF=0 */
		0x40202,		/* AC, IF */
		0xc95,			/* OF DF SF AF PF CF, IF=0 */
	};
	const u64 mask = X86_CF | X86_PF | X86_AF | X86_ZF | X86_SF | X86_IF | X86_DF |
			 X86_OF | X86_AC;
	u64 a0 = fl[i % ARRAY_SIZE(fl)], a1 = 0;
	CALL(T_POPF, a0, 0, 0, 0);
	EXPECT(r.rax & mask, a0 & mask);
	if (r.rax & X86_TF)
		return fail(c, "popf result has TF: 0x%lx", r.rax);
	return 0;
}

static int chk_cli_sti(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = i & 3, a1 = 0;
	CALL(T_CLI_STI, a0, 0, 0, 0);
	EXPECT_RESULT(5 | (a0 << 4));	/* IF=1 on entry, 0 after cli, 1 after sti */
	return 0;
}

static int chk_iretq(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	CALL(T_IRETQ, a0, 0, 0, 0);
	EXPECT_RESULT(3 * a0 + 1);
	return 0;
}

static int chk_ret(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	CALL(T_RET, a0, 0, 0, 0);
	EXPECT_RESULT((a0 ^ 0x5a5a) + (a0 & 1));
	return 0;
}

static int chk_ret_imm(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = V(i + 5);
	CALL(T_RET_IMM, a0, a1, 0, 0);
	EXPECT_RESULT(a0 + a1);
	return 0;
}

static int chk_lret(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	CALL(T_LRET, a0, 0, 0, 0);
	EXPECT_RESULT(a0 + 0x11);
	return 0;
}

static u64 h(u64 x) { return 3 * x + 1; }

static int check_call_result(struct ctx *c, struct trec *r, u64 want, u64 a0)
{
	if (r->rax == 0xbad)
		return fail(c, "callee saw a wrong return address 0x%lx (arg 0x%lx)", r->rdx, a0);
	if (r->rax != want)
		return fail(c, "result 0x%lx, expected 0x%lx (arg 0x%lx)", r->rax, want, a0);
	return 0;
}

static int chk_call_rel(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i) & 0xffffffff;
	CALL(T_CALL_REL, a0, 0, 0, 0);
	return check_call_result(c, &r, h(a0), a0);
}

static int chk_call_reg(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i) & 0xffffffff;
	CALL(T_CALL_REG, a0, 0, 0, 0);
	return check_call_result(c, &r, h(h(a0)), a0);
}

static int chk_call_mem(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i) & 0xffffffff;
	CALL(T_CALL_MEM, a0, 0, 0, 0);
	return check_call_result(c, &r, h(h(h(a0))), a0);
}

static int chk_lcall_mem(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i);
	CALL(T_LCALL_MEM, a0, 0, 0, 0);
	return check_call_result(c, &r, a0 + 5, a0);
}

static int chk_jmp_reg(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	CALL(T_JMP_REG, a0, 0, 0, 0);
	EXPECT_RESULT(a0 + 0x101);
	return 0;
}

static int chk_jmp_mem(struct ctx *c, u64 i)
{
	struct trec r;
	static const u64 want[] = { 0x10, 0x21, 0x32, 0x43 };
	u64 a0 = i ^ 0x100, a1 = 0;
	CALL(T_JMP_MEM, a0, 0, 0, 0);
	EXPECT_RESULT(want[a0 & 3]);
	return 0;
}

static int chk_ljmp_mem(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	CALL(T_LJMP_MEM, a0, 0, 0, 0);
	EXPECT_RESULT(a0 + 0x77);
	return 0;
}

static int chk_jmp_rel8(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	CALL(T_JMP_REL8, a0, 0, 0, 0);
	EXPECT_RESULT(a0 + 3);
	return 0;
}

static int chk_jmp_rel32(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = 0;
	CALL(T_JMP_REL32, a0, 0, 0, 0);
	EXPECT_RESULT(a0 + 3);
	return 0;
}

/* condition cc (0..15, as in the opcode) after cmp b, a (flags of a - b) */
static int cond(int cc, u64 a, u64 b)
{
	u64 res = a - b;
	int cf = a < b, zf = res == 0, sf = (int)(res >> 63);
	int of = (int)((((a ^ b) & (a ^ res)) >> 63) & 1);
	u8 lo = (u8)res;
	lo ^= lo >> 4;
	lo ^= lo >> 2;
	lo ^= lo >> 1;
	int pf = !(lo & 1);
	int t;
	switch (cc >> 1) {
	case 0: t = of; break;
	case 1: t = cf; break;
	case 2: t = zf; break;
	case 3: t = cf | zf; break;
	case 4: t = sf; break;
	case 5: t = pf; break;
	case 6: t = sf != of; break;
	default: t = zf | (sf != of); break;
	}
	return (cc & 1) ? !t : t;
}

static int chk_jcc(struct ctx *c, u64 i)
{
	struct trec r;
	static const u64 pairs[][2] = {
		{ 1, 2 }, { 2, 1 }, { 5, 5 }, { 0x7fffffffffffffff, ~0UL },
		{ ~0UL, 1 }, { 0x8000000000000000, 1 }, { 0, 0x8000000000000000 }, { 3, 0 },
		{ 0x100, 0x1 }, { 0x80, 0x7f }, { 0, 0 }, { ~0UL, ~0UL - 2 },
	};
	u64 a0 = pairs[i % ARRAY_SIZE(pairs)][0], a1 = pairs[i % ARRAY_SIZE(pairs)][1];
	u64 want = 0;
	for (int cc = 0; cc < 16; cc++)
		if (!cond(cc, a0, a1))
			want |= (1UL << cc) | (1UL << (16 + cc));
	if (!cond(4, a0, a1))
		want |= 1UL << 32;
	if (!cond(5, a0, a1))
		want |= 1UL << 33;
	CALL(T_JCC, a0, a1, 0, 0);
	EXPECT_RESULT(want);
	return 0;
}

static int chk_loop(struct ctx *c, u64 i)
{
	struct trec r;
	static const u64 cases[][3] = {
		{ 0, 0, 0 }, { 1, 3, 1 }, { 5, 8, 0 }, { 7, 20, 5 }, { 2, 1, 0 }, { 3, 0, 9 },
	};
	u64 a0 = cases[i % ARRAY_SIZE(cases)][0], a1 = cases[i % ARRAY_SIZE(cases)][1];
	u64 a2 = cases[i % ARRAY_SIZE(cases)][2];
	u64 k = (a1 >= 1 && a1 <= 8) ? a1 : 8;
	u64 want = 3 * a0 + 0x100 * k + 0x10000 * (a2 == 0 ? 4 : 1) + ((u32)a0 ? 0x1000000 : 0);
	CALL(T_LOOP, a0, a1, a2, 0);
	EXPECT_RESULT(want);
	return 0;
}

static int chk_int3(struct ctx *c, u64 i)
{
	struct trec r;
	struct qtest_cpu *me = this_cpu();
	u64 a0 = V(i), a1 = 0;
	u64 before = me->bp_count;
	CALL(T_INT3, a0, 0, 0, 0);
	EXPECT_RESULT(a0 + 7);
	EXPECT(me->bp_count, before + 1);
	EXPECT(me->bp_rip, qtest_int3_sites[0] + 1);
	return 0;
}

static int chk_fault(struct ctx *c, u64 i)
{
	struct trec r;
	struct qtest_cpu *me = this_cpu();
	u64 a0 = V(i) * 8, a1 = 0;
	u64 before = me->pf_count;
	CALL(T_FAULT, a0, 0, 0, 0);
	EXPECT_RESULT((u64)-14);
	EXPECT(me->pf_count, before + 1);
	EXPECT(me->pf_cr2, QTEST_FAULT_HOLE + (a0 & 0xff8));
	EXPECT(me->pf_rip, qtest_extable[0].insn);
	return 0;
}

static int chk_self_step(struct ctx *c, u64 i)
{
	struct trec r;
	struct qtest_cpu *me = this_cpu();
	u64 a0 = V(i), a1 = V(i + 3);
	CALL(T_SELF_STEP, a0, a1, 0, 0);
	if (me->step_active) {
		me->step_active = 0;
		return fail(c, "single-step not finished: %lu steps, last rip 0x%lx",
			    me->step_count, me->step_rip);
	}
	EXPECT(me->step_count, 7);
	EXPECT(me->step_rip, qtest_step_range[1]);
	EXPECT(me->dr6 & 0x400f, 0x4000);	/* the last #DB: BS, no B0-B3 */
	EXPECT_RESULT(a0 + a1 + 2);	/* the last +1 is TF as pushf saw it */
	return 0;
}

static int chk_hot(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i) + i, a1 = 0;
	CALL(T_HOT, a0, 0, 0, 0);
	EXPECT_RESULT(a0 + 1);
	return 0;
}

static u64 mixed_model(u64 a, u64 b, u64 cc, u64 d)
{
	u64 r = a * b + 4 * cc;
	u64 r12 = d & 0xff;
	r += r12;
	if (a & 1)
		r12 = b;
	r ^= r12;
	r -= (cc & 0xffff) * 0x3779b9;
	r += ((s64)a > (s64)b) ? b : a;
	r = (r << 13) | (r >> 51);
	r += (u64)(s64)(s8)d;
	return r;
}

static int chk_mixed(struct ctx *c, u64 i)
{
	struct trec r;
	u64 a0 = V(i), a1 = V(i + 1) * 3, a2 = V(i + 2) ^ 0x5555, a3 = V(i + 7) + 0x80 * i;
	CALL(T_MIXED, a0, a1, a2, a3);
	EXPECT_RESULT(mixed_model(a0, a1, a2, a3));
	return 0;
}

/* t_div: a / b; b = 0 raises #DE at the divq, fixed up to -8 */
static int chk_div(struct ctx *c, u64 i)
{
	struct trec r;
	struct qtest_cpu *me = this_cpu();
	u64 a0 = V(i) + 0x1000, a1 = i % 2 ? 0 : V(i + 5) | 1;
	u64 before = me->de_count;
	CALL(T_DIV, a0, a1, 0, 0);
	if (a1) {
		EXPECT_RESULT(a0 / a1);
		EXPECT(me->de_count, before);
	} else {
		EXPECT_RESULT((u64)-8);
		EXPECT(me->de_count, before + 1);
		EXPECT(me->de_rip, qtest_extable[1].insn);
	}
	return 0;
}

struct tdesc {
	int (*chk)(struct ctx *c, u64 iter);
	u32 ncases;	/* calls per target in one self-check round */
};

static const struct tdesc tdescs[QTEST_NTARGETS] = {
	[T_RIPREL_LOAD] = { chk_riprel_load, 8 },
	[T_RIPREL_STORE] = { chk_riprel_store, 4 },
	[T_RIPREL_CMP_IMM] = { chk_riprel_cmp_imm, 6 },
	[T_RIPREL_GS] = { chk_riprel_gs, 4 },
	[T_PUSHF] = { chk_pushf, 2 },
	[T_POPF] = { chk_popf, 6 },
	[T_CLI_STI] = { chk_cli_sti, 2 },
	[T_IRETQ] = { chk_iretq, 2 },
	[T_RET] = { chk_ret, 2 },
	[T_RET_IMM] = { chk_ret_imm, 2 },
	[T_LRET] = { chk_lret, 2 },
	[T_CALL_REL] = { chk_call_rel, 2 },
	[T_CALL_REG] = { chk_call_reg, 2 },
	[T_CALL_MEM] = { chk_call_mem, 2 },
	[T_LCALL_MEM] = { chk_lcall_mem, 2 },
	[T_JMP_REG] = { chk_jmp_reg, 2 },
	[T_JMP_MEM] = { chk_jmp_mem, 4 },
	[T_LJMP_MEM] = { chk_ljmp_mem, 2 },
	[T_JMP_REL8] = { chk_jmp_rel8, 2 },
	[T_JMP_REL32] = { chk_jmp_rel32, 2 },
	[T_JCC] = { chk_jcc, 12 },
	[T_LOOP] = { chk_loop, 6 },
	[T_INT3] = { chk_int3, 2 },
	[T_FAULT] = { chk_fault, 2 },
	[T_SELF_STEP] = { chk_self_step, 2 },
	[T_HOT] = { chk_hot, 2 },
	[T_MIXED] = { chk_mixed, 6 },
	[T_DIV] = { chk_div, 4 },
};

int target_index(const char *name)
{
	for (u64 i = 0; i < qtest_ntargets; i++)
		if (!strcmp(qtest_targets[i].name, name))
			return (int)i;
	return -1;
}

int target_check(struct ctx *c, int idx, u64 iter)
{
	c->why[0] = 0;
	return tdescs[idx].chk(c, iter);
}

/* one round over all targets; fails[t] / reasons[t] record the first failure */
static char reasons[QTEST_NTARGETS][200];
static u64 fail_rounds[QTEST_NTARGETS], first_fail_round[QTEST_NTARGETS];

static int check_target_once(struct ctx *c, int t)
{
	u64 before = READ_ONCE(qtest_calls[t]);
	for (u64 k = 0; k < tdescs[t].ncases; k++) {
		if (target_check(c, t, k))
			return -1;
	}
	u64 after = READ_ONCE(qtest_calls[t]);
	if (after - before != tdescs[t].ncases)
		return fail(c, "call counter went up by %lu for %u calls", after - before,
			    tdescs[t].ncases);
	return 0;
}

u64 selfcheck_run(u64 rounds, int quiet)
{
	struct ctx c = { .smp = 0 };
	memset(fail_rounds, 0, sizeof(fail_rounds));
	for (u64 round = 0; round < rounds; round++) {
		for (u64 t = 0; t < qtest_ntargets; t++) {
			if (check_target_once(&c, (int)t) == 0)
				continue;
			if (!fail_rounds[t]++) {
				first_fail_round[t] = round;
				memcpy(reasons[t], c.why, sizeof(reasons[t]));
			}
		}
	}
	u64 passed = 0, failed = 0;
	if (rounds != 1 && !quiet)
		kprintf("qtest: selfcheck rounds=%lu\n", rounds);
	for (u64 t = 0; t < qtest_ntargets; t++) {
		if (!fail_rounds[t]) {
			passed++;
			if (!quiet)
				kprintf("PASS %s\n", qtest_targets[t].name);
			continue;
		}
		failed++;
		if (rounds == 1)
			kprintf("FAIL %s: %s\n", qtest_targets[t].name, reasons[t]);
		else
			kprintf("FAIL %s: %s (first in round %lu, %lu of %lu rounds failed)\n",
				qtest_targets[t].name, reasons[t], first_fail_round[t] + 1,
				fail_rounds[t], rounds);
	}
	if (!quiet || failed)
		kprintf("qtest: selfcheck %lu passed, %lu failed\n", passed, failed);
	return failed;
}

/* n checked calls of one target; returns the number of failed calls */
u64 run_target(int idx, u64 n, int print_fail)
{
	struct ctx c = { .smp = 0 };
	u64 failed = 0;
	u64 before = READ_ONCE(qtest_calls[idx]);
	for (u64 i = 0; i < n; i++) {
		if (target_check(&c, idx, i) == 0)
			continue;
		if (!failed++ && print_fail)
			kprintf("FAIL %s: %s (call %lu)\n", qtest_targets[idx].name, c.why, i + 1);
	}
	u64 after = READ_ONCE(qtest_calls[idx]);
	if (after - before != n && !failed) {
		failed = 1;
		if (print_fail)
			kprintf("FAIL %s: call counter went up by %lu for %lu calls\n",
				qtest_targets[idx].name, after - before, n);
	}
	return failed;
}

/* n direct calls of t_hot, no trampoline */
u64 hot_loop(u64 n, u64 *cycles)
{
	u64 sum = 0;
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		sum += t_hot(i);
	u64 t1 = rdtsc();
	*cycles = t1 - t0;
	u64 want = n * (n + 1) / 2;	/* sum of i + 1 */
	return sum != want;
}

/* n rounds of every SMP-safe target on this CPU; 0 or -1 with c->why */
int smp_work(struct ctx *c, u64 n)
{
	for (u64 i = 0; i < n; i++) {
		for (u64 t = 0; t < qtest_ntargets; t++) {
			if (!(qtest_targets[t].flags & TFLAG_SMP))
				continue;
			if (target_check(c, (int)t, i)) {
				char tmp[200];
				memcpy(tmp, c->why, sizeof(tmp));
				ksnprintf(c->why, sizeof(c->why), "%s: %s", qtest_targets[t].name, tmp);
				return -1;
			}
		}
	}
	return 0;
}

void target_counts_snapshot(u64 *out)
{
	for (int t = 0; t < QTEST_NTARGETS; t++)
		out[t] = READ_ONCE(qtest_calls[t]);
}
