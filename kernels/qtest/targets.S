/*
 * qtest target functions: one per instruction class that Linux kprobes'
 * x86 code treats specially.  Every target
 *   - is a global STT_FUNC symbol with a correct st_size,
 *   - starts with the 5-byte ftrace nop 0f 1f 44 00 00,
 *   - then counts its call: lock incq qtest_calls+8*INDEX(%rip),
 *   - takes its arguments in rdi/rsi/rdx/rcx and returns a value in rax
 *     that selfcheck.c checks against a C model.
 * qtest_targets[] (32 bytes per entry: name, addr, size, flags) describes
 * them in index order; qtest_ntargets holds the count.
 */
#include "abi.h"

	.set .Ltcount, 0

	.pushsection .rodata.qtest_targets, "a"
	.balign 32
	.globl qtest_targets
	.type qtest_targets, @object
qtest_targets:
	.popsection

.macro TARGET name, idx, flags
	.if \idx - .Ltcount
	.error "target \name: index out of order"
	.endif
	.set .Ltcount, .Ltcount + 1
	.pushsection .rodata.qtest_names, "a"
.Lname_\name:
	.asciz "\name"
	.popsection
	.pushsection .rodata.qtest_targets, "a"
	.quad .Lname_\name, \name, .Lend_\name - \name, \flags
	.popsection
	.text
	.balign 16
	.globl \name
	.type \name, @function
\name:
	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00	/* nopl 0x0(%rax,%rax,1) */
	lock incq qtest_calls + 8 * \idx(%rip)
.endm

.macro ENDTARGET name
.Lend_\name:
	.size \name, . - \name
.endm

/* ------------------------------------------------------------------ */
/* data the targets use                                               */
/* ------------------------------------------------------------------ */
	.data
	.balign 64
	.globl qt_load_val, qt_store_val, qt_store32, qt_cmp_word, qt_acc
	.globl qt_w16, qt_b, qt_helper_ptr, qt_helper_tab, qt_jmp_ptr
	.globl qt_jmp_ptr2, qt_jtab, qt_far_helper, qt_far_jmp
qt_load_val:	.quad 0x1122334455667788
qt_load_val2:	.quad 0x0f0e0d0c0b0a0908
qt_store_val:	.quad 0
qt_store32:	.long 0
qt_cmp_word:	.long 0
qt_acc:		.quad 0
qt_w16:		.word 0
qt_b:		.byte 0
		.balign 8
qt_helper_ptr:	.quad qtest_helper
qt_helper_tab:	.quad 0, qtest_helper
qt_jmp_ptr:	.quad .Ljm_dst
qt_jmp_ptr2:	.quad .Ljm3b
qt_jtab:	.quad .Ljm0, .Ljm1, .Ljm2, .Ljm3
qt_far_helper:	.quad qtest_far_helper	/* m16:64 far pointer */
		.word SEL_CODE64
		.balign 8
qt_far_jmp:	.quad .Lljmp_dst
		.word SEL_CODE64
		.balign 8

/* #BP sites the guest's own int3 handler accepts: .rodata.qtest_int3_sites
   (qtest_int3_sites..qtest_int3_sites_end, defined by the linker script);
   exception table: .rodata.qtest_extable (qtest_extable..qtest_extable_end) */

/* ------------------------------------------------------------------ */
/* helpers (not targets)                                              */
/* ------------------------------------------------------------------ */
	.text
	/* rax = 3*rdi + 1, rdx = our return address (checked by the caller) */
	.balign 16
	.globl qtest_helper
	.type qtest_helper, @function
qtest_helper:
	movq	(%rsp), %rdx
	leaq	1(%rdi,%rdi,2), %rax
	ret
	.size qtest_helper, . - qtest_helper

	/* far-called: rax = rdi + 5, rdx = return rip, rcx = return cs */
	.balign 16
	.globl qtest_far_helper
	.type qtest_far_helper, @function
qtest_far_helper:
	movq	(%rsp), %rdx
	movq	8(%rsp), %rcx
	leaq	5(%rdi), %rax
	lretq
	.size qtest_far_helper, . - qtest_far_helper

/* ------------------------------------------------------------------ */
/* rip-relative                                                       */
/* ------------------------------------------------------------------ */

/* ((qt_load_val + a) ^ qt_load_val2) + byte 1 of qt_load_val */
TARGET t_riprel_load, T_RIPREL_LOAD, TFLAG_SMP
	movq	qt_load_val(%rip), %rax		/* 48 8b 05 disp32 */
	addq	%rdi, %rax
	leaq	qt_load_val(%rip), %rdx		/* 48 8d 15 disp32 */
	xorq	8(%rdx), %rax
	movzbl	qt_load_val+1(%rip), %ecx	/* 0f b6 0d disp32 */
	addq	%rcx, %rax
	ret
ENDTARGET t_riprel_load

/* returns the old qt_store_val; stores a there and (u32)a in qt_store32 */
TARGET t_riprel_store, T_RIPREL_STORE, 0
	movq	qt_store_val(%rip), %rax	/* 48 8b 05 disp32 */
	movq	%rdi, qt_store_val(%rip)	/* 48 89 3d disp32 */
	movl	%edi, qt_store32(%rip)		/* 89 3d disp32 */
	ret
ENDTARGET t_riprel_store

/*
 * rip-relative operands followed by an immediate (the displacement is not
 * the last field of the instruction).
 * bit0 = ((u32)a == 0x12345), bit1 = ((u8)b == 0x5a), bit2 = a bit 31,
 * bits 8.. = (u32)(3 * (u32)a); qt_acc += 7; qt_w16 = 0x1234; qt_b = (u8)b
 */
TARGET t_riprel_cmp_imm, T_RIPREL_CMP_IMM, 0
	movl	%edi, qt_cmp_word(%rip)
	xorl	%eax, %eax
	cmpl	$0x12345, qt_cmp_word(%rip)	/* 81 3d disp32 imm32 */
	jne	1f
	orl	$1, %eax
1:	addq	$7, qt_acc(%rip)		/* 48 83 05 disp32 imm8 */
	movw	$0x1234, qt_w16(%rip)		/* 66 c7 05 disp32 imm16 */
	movb	%sil, qt_b(%rip)
	cmpb	$0x5a, qt_b(%rip)		/* 80 3d disp32 imm8 */
	jne	2f
	orl	$2, %eax
2:	testl	$0x80000000, qt_cmp_word(%rip)	/* f7 05 disp32 imm32 */
	jz	3f
	orl	$4, %eax
3:	imull	$3, qt_cmp_word(%rip), %edx	/* 6b 15 disp32 imm8 */
	shlq	$8, %rdx
	orq	%rdx, %rax
	ret
ENDTARGET t_riprel_cmp_imm

/*
 * Per-CPU data through %gs with rip-relative addressing, like Linux:
 * GS base = this CPU's area - &qtest_percpu, so %gs:qtest_percpu+F(%rip)
 * is field F of this CPU's struct qtest_cpu.
 * Returns the new per-CPU counter.
 */
TARGET t_riprel_gs, T_RIPREL_GS, TFLAG_SMP
	incl	%gs:qtest_percpu+PCPU_GS_COUNTER(%rip)		/* 65 ff 05 disp32 */
	addq	%rdi, %gs:qtest_percpu+PCPU_GS_SUM(%rip)	/* 65 48 01 3d disp32 */
	addq	$3, %gs:qtest_percpu+PCPU_GS_AUX(%rip)		/* 65 48 83 05 disp32 imm8 */
	movl	%gs:qtest_percpu+PCPU_GS_COUNTER(%rip), %eax	/* 65 8b 05 disp32 */
	ret
ENDTARGET t_riprel_gs

/* ------------------------------------------------------------------ */
/* interrupt-flag modifiers                                           */
/* ------------------------------------------------------------------ */

/* returns rflags as pushf sees it */
TARGET t_pushf, T_PUSHF, TFLAG_SMP
	pushfq
	popq	%rax
	ret
ENDTARGET t_pushf

/* popf a, returns rflags as then seen by pushf, restores the caller's rflags */
TARGET t_popf, T_POPF, TFLAG_SMP
	pushfq
	pushq	%rdi
	popfq
	pushfq
	popq	%rax
	popfq
	ret
ENDTARGET t_popf

/* bit0 = IF on entry, bit1 = IF after cli, bit2 = IF after sti, | a << 4 */
TARGET t_cli_sti, T_CLI_STI, TFLAG_SMP
	pushfq
	popq	%rdx
	cli
	pushfq
	popq	%rcx
	sti
	pushfq
	popq	%rax
	shrq	$9, %rdx
	andl	$1, %edx
	shrq	$9, %rcx
	andl	$1, %ecx
	shrq	$9, %rax
	andl	$1, %eax
	shll	$2, %eax
	leal	(%eax,%ecx,2), %eax
	orl	%edx, %eax
	shlq	$4, %rdi
	orq	%rdi, %rax
	ret
ENDTARGET t_cli_sti

/* ------------------------------------------------------------------ */
/* ret / lret / iret ("rip is right")                                  */
/* ------------------------------------------------------------------ */

/* iretq to a label in this function with CF set in the frame: 3*a + 1 */
TARGET t_iretq, T_IRETQ, TFLAG_SMP
	pushq	%rbp
	movq	%rsp, %rbp
	movl	%ss, %eax
	pushq	%rax			/* SS */
	pushq	%rbp			/* RSP */
	pushfq				/* RFLAGS */
	orq	$1, (%rsp)		/*   with CF set */
	movl	%cs, %eax
	pushq	%rax			/* CS */
	leaq	1f(%rip), %rax
	pushq	%rax			/* RIP */
	iretq				/* 48 cf */
	ud2
1:	sbbq	%rdx, %rdx		/* rdx = -CF */
	leaq	(%rdi,%rdi,2), %rax
	subq	%rdx, %rax
	popq	%rbp
	ret
ENDTARGET t_iretq

/* (a ^ 0x5a5a) + (a & 1); even a returns through ret, odd through repz ret */
TARGET t_ret, T_RET, TFLAG_SMP
	movq	%rdi, %rax
	xorq	$0x5a5a, %rax
	testb	$1, %dil
	jnz	1f
	ret				/* c3 */
1:	addq	$1, %rax
	repz ret			/* f3 c3 */
ENDTARGET t_ret

/* a + b, computed by an inner routine that pops its two stack args: ret $16 */
TARGET t_ret_imm, T_RET_IMM, TFLAG_SMP
	pushq	%rbp
	movq	%rsp, %rbp
	pushq	%rsi
	pushq	%rdi
	call	.Lret_imm_inner		/* callee pops the two arguments */
	popq	%rbp
	ret
.Lret_imm_inner:
	movq	8(%rsp), %rax
	addq	16(%rsp), %rax
	ret	$16			/* c2 10 00 */
ENDTARGET t_ret_imm

/* far returns to labels in this function: a + 0x11 */
TARGET t_lret, T_LRET, TFLAG_SMP
	movl	%cs, %eax
	pushq	%rax
	leaq	1f(%rip), %rdx
	pushq	%rdx
	lretq				/* 48 cb */
	ud2
1:	pushq	$0x5555			/* released by lretq $8 */
	movl	%cs, %eax
	pushq	%rax
	leaq	2f(%rip), %rdx
	pushq	%rdx
	lretq	$8			/* 48 ca 08 00 */
	ud2
2:	leaq	0x11(%rdi), %rax
	ret
ENDTARGET t_lret

/* ------------------------------------------------------------------ */
/* calls ("fix return address")                                       */
/* ------------------------------------------------------------------ */
/* every call checks the return address qtest_helper saw (rdx) */
.macro CHECK_RA label
	leaq	\label(%rip), %r8
	cmpq	%r8, %rdx
	jne	.Lbad_ra
.endm

/* helper(a) through call rel32: 3a + 1 */
TARGET t_call_rel, T_CALL_REL, TFLAG_SMP
	pushq	%rbp
	movq	%rsp, %rbp
	call	qtest_helper		/* e8 rel32 */
1:	CHECK_RA 1b
	popq	%rbp
	ret
ENDTARGET t_call_rel

/* helper(helper(a)) through call *%rax and call *%r11: 9a + 4 */
TARGET t_call_reg, T_CALL_REG, TFLAG_SMP
	pushq	%rbp
	movq	%rsp, %rbp
	leaq	qtest_helper(%rip), %rax
	call	*%rax			/* ff d0 (ff /2) */
1:	CHECK_RA 1b
	movq	%rax, %rdi
	leaq	qtest_helper(%rip), %r11
	call	*%r11			/* 41 ff d3 */
2:	CHECK_RA 2b
	popq	%rbp
	ret
ENDTARGET t_call_reg

/* helper^3(a) through call *x(%rip), call *(%rax), call *(%rax,%rcx,8): 27a + 13 */
TARGET t_call_mem, T_CALL_MEM, TFLAG_SMP
	pushq	%rbp
	movq	%rsp, %rbp
	call	*qt_helper_ptr(%rip)	/* ff 15 disp32 */
1:	CHECK_RA 1b
	movq	%rax, %rdi
	leaq	qt_helper_ptr(%rip), %rax
	call	*(%rax)			/* ff 10 */
2:	CHECK_RA 2b
	movq	%rax, %rdi
	leaq	qt_helper_tab(%rip), %rax
	movl	$1, %ecx
	call	*(%rax,%rcx,8)		/* ff 14 c8 */
3:	CHECK_RA 3b
	popq	%rbp
	ret
ENDTARGET t_call_mem

/* far indirect call, ff /3 with REX.W (m16:64): a + 5; checks rip and cs */
TARGET t_lcall_mem, T_LCALL_MEM, TFLAG_SMP
	pushq	%rbp
	movq	%rsp, %rbp
	rex.w lcall *qt_far_helper(%rip)	/* 48 ff 1d disp32 */
1:	CHECK_RA 1b
	cmpq	$SEL_CODE64, %rcx
	jne	.Lbad_ra
	popq	%rbp
	ret
ENDTARGET t_lcall_mem

/* return address mismatch: rax = 0xbad, rdx keeps what the helper saw */
	.text
	.balign 16
	.type qtest_bad_ra, @function
qtest_bad_ra:
.Lbad_ra:
	movl	$0xbad, %eax
	leave
	ret
	.size qtest_bad_ra, . - qtest_bad_ra

/* ------------------------------------------------------------------ */
/* indirect jumps ("rip is right")                                     */
/* ------------------------------------------------------------------ */

/* jmp *%rax, jmp *%r10 to labels here: a + 0x101 */
TARGET t_jmp_reg, T_JMP_REG, TFLAG_SMP
	leaq	1f(%rip), %rax
	jmp	*%rax			/* ff e0 (ff /4) */
	ud2
1:	leaq	0x100(%rdi), %rax
	leaq	2f(%rip), %r10
	jmp	*%r10			/* 41 ff e2 */
	ud2
2:	addq	$1, %rax
	ret
ENDTARGET t_jmp_reg

/* jmp *x(%rip) then a jump table jmp *(%rax,%rcx,8) on a & 3:
   0 -> 0x10, 1 -> 0x21, 2 -> 0x32, 3 -> (jmp *(%rax)) 0x43 */
TARGET t_jmp_mem, T_JMP_MEM, TFLAG_SMP
	jmp	*qt_jmp_ptr(%rip)	/* ff 25 disp32 */
	ud2
.Ljm_dst:
	movl	%edi, %ecx
	andl	$3, %ecx
	leaq	qt_jtab(%rip), %rax
	jmp	*(%rax,%rcx,8)		/* ff 24 c8 */
	ud2
.Ljm0:	movl	$0x10, %eax
	ret
.Ljm1:	movl	$0x21, %eax
	ret
.Ljm2:	movl	$0x32, %eax
	ret
.Ljm3:	leaq	qt_jmp_ptr2(%rip), %rax
	jmp	*(%rax)			/* ff 20 */
	ud2
.Ljm3b:	movl	$0x43, %eax
	ret
ENDTARGET t_jmp_mem

/* far indirect jump, ff /5 with REX.W (m16:64), to a label here: a + 0x77 */
TARGET t_ljmp_mem, T_LJMP_MEM, TFLAG_SMP
	rex.w ljmp *qt_far_jmp(%rip)	/* 48 ff 2d disp32 */
	ud2
.Lljmp_dst:
	leaq	0x77(%rdi), %rax
	ret
ENDTARGET t_ljmp_mem

/* ------------------------------------------------------------------ */
/* relative jumps ("relative branch")                                  */
/* ------------------------------------------------------------------ */

/* forward and backward jmp rel8: a + 3 */
TARGET t_jmp_rel8, T_JMP_REL8, TFLAG_SMP
	movq	%rdi, %rax
	.byte 0xeb, 1f - . - 1		/* jmp rel8 forward */
	addq	$0x1000, %rax
1:	addq	$1, %rax
	.byte 0xeb, 3f - . - 1		/* jmp rel8 forward */
2:	addq	$2, %rax
	ret
3:	.byte 0xeb, 2b - . - 1		/* jmp rel8 backward */
ENDTARGET t_jmp_rel8

/* the same with jmp rel32: a + 3 */
TARGET t_jmp_rel32, T_JMP_REL32, TFLAG_SMP
	movq	%rdi, %rax
	.byte 0xe9
	.long 1f - . - 4		/* jmp rel32 forward */
	addq	$0x1000, %rax
1:	addq	$1, %rax
	.byte 0xe9
	.long 3f - . - 4		/* jmp rel32 forward */
2:	addq	$2, %rax
	ret
3:	.byte 0xe9
	.long 2b - . - 4		/* jmp rel32 backward */
ENDTARGET t_jmp_rel32

/*
 * All 16 condition codes after cmp %rsi,%rdi (flags of a - b), each as
 * jcc rel8 (bit cc) and jcc rel32 (bit 16 + cc); a bit is set when the
 * branch was NOT taken.  Bits 32/33: je rel8 with a 3e prefix and jne
 * rel32 with a 2e prefix (branch hints), also set when not taken.
 */
.macro JCC8 cc
	cmpq	%rsi, %rdi
	.byte 0x70 + \cc, 1f - . - 1
	btsq	$\cc, %rax
1:
.endm
.macro JCC32 cc
	cmpq	%rsi, %rdi
	.byte 0x0f, 0x80 + \cc
	.long 1f - . - 4
	btsq	$16 + \cc, %rax
1:
.endm

TARGET t_jcc, T_JCC, TFLAG_SMP
	xorl	%eax, %eax
	.irp cc, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	JCC8 \cc
	JCC32 \cc
	.endr
	cmpq	%rsi, %rdi
	.byte 0x3e, 0x74, 1f - . - 1	/* ds je rel8 */
	btsq	$32, %rax
1:	cmpq	%rsi, %rdi
	.byte 0x2e, 0x0f, 0x85		/* cs jne rel32 */
	.long 2f - . - 4
	btsq	$33, %rax
2:	ret
ENDTARGET t_jcc

/*
 * loop / loopne / loope / jrcxz / jecxz:
 * 3*a  (loop, a times; jrcxz skips it for a == 0)
 * + 0x100 * k, k = b if 1 <= b <= 8 else 8   (loopne, rcx = 8, dec b)
 * + 0x10000 * (c == 0 ? 4 : 1)               (loope, rcx = 4, ZF = (c == 0))
 * + 0x1000000 if (u32)a != 0                 (jecxz)
 */
TARGET t_loop, T_LOOP, TFLAG_SMP
	movq	%rdx, %r9
	xorl	%eax, %eax
	movq	%rdi, %rcx
	jrcxz	2f			/* e3 */
1:	addq	$3, %rax
	loop	1b			/* e2 */
2:	movl	$8, %ecx
	movq	%rsi, %rdx
3:	addq	$0x100, %rax
	decq	%rdx
	loopne	3b			/* e0 */
	movl	$4, %ecx
4:	addq	$0x10000, %rax
	testq	%r9, %r9
	loope	4b			/* e1 */
	movl	%edi, %ecx
	jecxz	5f			/* 67 e3 */
	addq	$0x1000000, %rax
5:	ret
ENDTARGET t_loop

/* ------------------------------------------------------------------ */
/* original int3 / fault / self single-step                            */
/* ------------------------------------------------------------------ */

/* an int3 the guest's #BP handler owns (listed in qtest_int3_sites): a + 7 */
TARGET t_int3, T_INT3, TFLAG_SMP | TFLAG_TRAPS
.Lint3_site:
	int3				/* cc */
	leaq	7(%rdi), %rax
	ret
	.pushsection .rodata.qtest_int3_sites, "a"
	.quad .Lint3_site
	.popsection
ENDTARGET t_int3

/* load from QTEST_FAULT_HOLE + (a & 0xff8): #PF, exception-table fixup -> -14 */
TARGET t_fault, T_FAULT, TFLAG_SMP | TFLAG_TRAPS
	movl	%edi, %edx
	andl	$0xff8, %edx
	movq	$QTEST_FAULT_HOLE, %rax
	addq	%rdx, %rax
.Lfault_insn:
	movq	(%rax), %rax		/* faults */
	ret
.Lfault_fixup:
	movq	$-14, %rax		/* -EFAULT */
	ret
	.pushsection .rodata.qtest_extable, "a"
	.quad .Lfault_insn, .Lfault_fixup
	.popsection
ENDTARGET t_fault

/*
 * Sets TF with popf; the guest's #DB handler counts the 7 single-step traps
 * (rip in (qtest_step_begin, qtest_step_end]) and clears TF at
 * qtest_step_end.  pushf inside sees TF = 1.  Returns a + b + 2.
 */
TARGET t_self_step, T_SELF_STEP, TFLAG_SMP | TFLAG_TRAPS
	pushq	%rbp
	movq	%rsp, %rbp
	movq	$0, %gs:qtest_percpu+PCPU_STEP_COUNT(%rip)
	movq	$1, %gs:qtest_percpu+PCPU_STEP_ACTIVE(%rip)
	pushfq
	orq	$0x100, (%rsp)		/* TF */
	popfq
.Lstep_begin:
	leaq	1(%rdi), %rax		/* trap 1 (after this instruction) */
	pushfq				/* 2 */
	popq	%rcx			/* 3 */
	addq	%rsi, %rax		/* 4 */
	shrq	$8, %rcx		/* 5 */
	andl	$1, %ecx		/* 6 */
	addq	%rcx, %rax		/* 7: #DB handler clears TF here */
.Lstep_end:
	popq	%rbp
	ret
ENDTARGET t_self_step

	.section .rodata
	.balign 8
	.globl qtest_step_range
qtest_step_range:
	.quad .Lstep_begin, .Lstep_end

/* ------------------------------------------------------------------ */
/* hot path and ordinary code                                          */
/* ------------------------------------------------------------------ */

/* a + 1 */
TARGET t_hot, T_HOT, TFLAG_SMP
	leaq	1(%rdi), %rax
	ret
ENDTARGET t_hot

/* ordinary integer code, modelled by mixed_model() in selfcheck.c */
TARGET t_mixed, T_MIXED, TFLAG_SMP
	pushq	%rbp
	movq	%rsp, %rbp
	pushq	%rbx
	pushq	%r12
	pushq	%r13
	movq	%rdi, %rbx
	imulq	%rsi, %rbx		/* rbx = a * b */
	leaq	(%rbx,%rdx,4), %rax	/* r = a*b + 4c */
	movzbl	%cl, %r12d		/* r12 = (u8)d */
	addq	%r12, %rax
	testb	$1, %dil
	cmovnzq	%rsi, %r12		/* r12 = (a & 1) ? b : (u8)d */
	xorq	%r12, %rax
	movzwl	%dx, %r13d
	imulq	$0x3779b9, %r13, %r13	/* (u16)c * 0x3779b9 */
	subq	%r13, %rax
	movq	%rdi, %r8
	cmpq	%rsi, %rdi
	cmovgq	%rsi, %r8		/* min(a, b), signed */
	addq	%r8, %rax
	rolq	$13, %rax
	movsbq	%cl, %r8		/* (s8)d */
	addq	%r8, %rax
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	ret
ENDTARGET t_mixed

/* ------------------------------------------------------------------ */
/* a fault that is not a #PF                                           */
/* ------------------------------------------------------------------ */

/* a / b with divq: b = 0 raises #DE, exception-table fixup -> -8 */
TARGET t_div, T_DIV, TFLAG_SMP | TFLAG_TRAPS
	movq	%rdi, %rax
	xorl	%edx, %edx
.Ldiv_insn:
	divq	%rsi			/* 48 f7 f6: #DE when b = 0 */
	ret
.Ldiv_fixup:
	movq	$-8, %rax
	ret
	.pushsection .rodata.qtest_extable, "a"
	.quad .Ldiv_insn, .Ldiv_fixup
	.popsection
ENDTARGET t_div

/* ------------------------------------------------------------------ */
	.pushsection .rodata.qtest_targets, "a"
	.size qtest_targets, . - qtest_targets
	.popsection

	.section .rodata
	.balign 8
	.globl qtest_ntargets
	.type qtest_ntargets, @object
qtest_ntargets:
	.quad .Ltcount
	.size qtest_ntargets, 8
	.if .Ltcount - QTEST_NTARGETS
	.error "QTEST_NTARGETS does not match the targets defined"
	.endif
