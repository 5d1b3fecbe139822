/*
 * qtest ABI: constants shared by the assembly and C sources, and by the host
 * side (see README.md).  Plain numbers only: this file is included by .S files.
 */
#ifndef QTEST_ABI_H
#define QTEST_ABI_H

/* ---- memory map ---- */
#define QTEST_KERNEL_BASE    0xffffffff80000000 /* VA of physical 0 (2 MiB pages) */
#define QTEST_KMAP_SIZE      0x2000000          /* 32 MiB mapped there */
#define QTEST_PHYS_LIMIT     0x2000000          /* qtest never touches phys >= this */
#define QTEST_IMAGE_PHYS     0x100000           /* load address of the image */
#define QTEST_4K_VA          0xffffffff90000000 /* qtest_4k_area, 4 KiB PTEs */
#define QTEST_4K_PAGES       4
#define QTEST_LAPIC_VA       0xffffffff901ff000 /* LAPIC MMIO, 4 KiB PTE, PCD */
#define QTEST_LAPIC_PHYS     0xfee00000
#define QTEST_FAULT_HOLE     0xffffffff88000000 /* never mapped; t_fault reads it */
#define QTEST_MODULE_START   0xffffffffa0000000 /* never mapped by qtest (qprobes' area) */
#define QTEST_MODULE_END     0xffffffffff000000
#define QTEST_AP_TRAMP_PHYS  0x8000             /* real-mode AP trampoline page */
#define QTEST_MAX_CPUS       4
#define QTEST_STACK_SIZE     0x8000             /* kernel stack per CPU (.bss) */
#define QTEST_IST_SIZE       0x4000             /* each IST stack */

/* ---- GDT selectors ---- */
#define SEL_CODE32 0x08
#define SEL_CODE64 0x10
#define SEL_DATA   0x18
#define SEL_TSS0   0x20   /* TSS of cpu N at SEL_TSS0 + 16*N */
#define GDT_ENTRIES (4 + 2 * QTEST_MAX_CPUS)

/* ---- interrupt vectors ---- */
#define VEC_WAKE     0xf0  /* IPI that wakes an idle AP */
#define VEC_SPURIOUS 0xff  /* LAPIC spurious vector */

/* IST slots (1-based, as in the gate descriptor) */
#define IST_DB  1
#define IST_NMI 2
#define IST_DF  3

/* ---- targets: index into qtest_calls[] and qtest_targets[] ---- */
#define T_RIPREL_LOAD     0
#define T_RIPREL_STORE    1
#define T_RIPREL_CMP_IMM  2
#define T_RIPREL_GS       3
#define T_PUSHF           4
#define T_POPF            5
#define T_CLI_STI         6
#define T_IRETQ           7
#define T_RET             8
#define T_RET_IMM         9
#define T_LRET           10
#define T_CALL_REL       11
#define T_CALL_REG       12
#define T_CALL_MEM       13
#define T_LCALL_MEM      14
#define T_JMP_REG        15
#define T_JMP_MEM        16
#define T_LJMP_MEM       17
#define T_JMP_REL8       18
#define T_JMP_REL32      19
#define T_JCC            20
#define T_LOOP           21
#define T_INT3           22
#define T_FAULT          23
#define T_SELF_STEP      24
#define T_HOT            25
#define T_MIXED          26
#define T_DIV            27
#define QTEST_NTARGETS   28

/* qtest_targets[].flags */
#define TFLAG_SMP        1  /* safe to run on several CPUs at once (smp command) */
#define TFLAG_TRAPS      2  /* raises an exception the guest handles itself */

/* ---- per-CPU area (struct qtest_cpu) field offsets ---- */
#define PCPU_SELF         0
#define PCPU_CPU_ID       8
#define PCPU_GS_COUNTER  16   /* u32, t_riprel_gs: incl %gs:..(%rip) */
#define PCPU_GS_SUM      24   /* u64, t_riprel_gs: addq %rdi, %gs:..(%rip) */
#define PCPU_GS_AUX      32   /* u64, t_riprel_gs: addq $3, %gs:..(%rip) */
#define PCPU_TREC        40   /* trampoline: record pointer */
#define PCPU_TRSP        48   /* trampoline: saved rsp */
#define PCPU_STEP_ACTIVE 56   /* t_self_step in progress */
#define PCPU_STEP_COUNT  64   /* #DB single-step traps counted */
#define PCPU_STEP_RIP    72   /* rip of the last counted step */
#define PCPU_DR6         80   /* dr6 seen by the last #DB */
#define PCPU_BP_COUNT    88   /* own int3 hits (#BP) */
#define PCPU_BP_RIP      96   /* frame rip of the last own int3 (site + 1) */
#define PCPU_PF_COUNT   104   /* #PF fixed up through the exception table */
#define PCPU_PF_CR2     112
#define PCPU_PF_RIP     120   /* faulting rip of the last fixed-up #PF */
#define PCPU_APIC_ID    128

/* ---- trampoline record (struct trec) offsets ---- */
#define TREC_RSP_BEFORE    0
#define TREC_RSP_AFTER     8
#define TREC_RBX          16
#define TREC_RBP          24
#define TREC_R12          32
#define TREC_R13          40
#define TREC_R14          48
#define TREC_R15          56
#define TREC_RFLAGS_BEFORE 64
#define TREC_RFLAGS_AFTER  72
#define TREC_RAX          80
#define TREC_RDX          88

/* callee-saved register canaries loaded before each target call */
#define CANARY_RBX 0x0b0b1b2b3b4b5b6b
#define CANARY_RBP 0x0b0b1b2b3b4b5b7b
#define CANARY_R12 0x0c0c1c2c3c4c5c12
#define CANARY_R13 0x0c0c1c2c3c4c5c13
#define CANARY_R14 0x0c0c1c2c3c4c5c14
#define CANARY_R15 0x0c0c1c2c3c4c5c15

/* ---- isa-debug-exit ---- */
#define QTEST_EXIT_PORT    0xf4
#define QTEST_EXIT_SUCCESS 0x10  /* QEMU exits with 33 */
#define QTEST_EXIT_FAILURE 0x11  /* QEMU exits with 35 */

/* ---- mailbox commands ---- */
#define MBOX_SELFCHECK 1
#define MBOX_HOT       2
#define MBOX_RUN       3
#define MBOX_EXIT      4

#endif
