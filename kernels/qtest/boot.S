/*
 * qtest boot: Xen PVH entry (32-bit protected mode, paging off, %ebx =
 * physical address of struct hvm_start_info), long mode, jump to the
 * high-linked kernel at QTEST_KERNEL_BASE + phys.
 */
#include "abi.h"

#define PHYS(x) ((x) - QTEST_KERNEL_BASE)

/* ---- XEN_ELFNOTE_PHYS32_ENTRY: QEMU -kernel finds it in a PT_NOTE ---- */
	.pushsection .note.Xen, "a", @note
	.balign 4
	.long 4			/* namesz */
	.long 8			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad qtest_start32
	.balign 4
	.popsection

/* ---- low-linked boot stub (VMA == LMA, identity mapped while booting) ---- */
	.section .boot.text, "ax"
	.code32
	.globl qtest_start32
	.type qtest_start32, @function
qtest_start32:
	cli
	cld
	/* keep %ebx (hvm_start_info) untouched until qtest_main */
	lgdt	PHYS(qtest_gdt_ptr32)
	ljmp	$SEL_CODE32, $1f
1:	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	$PHYS(qtest_pml4), %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx	/* EFER */
	rdmsr
	orl	$0x100, %eax		/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80010001, %eax	/* PG | WP | PE */
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $2f

	.code64
2:	movabsq	$qtest_start64, %rax
	jmp	*%rax
	.size qtest_start32, . - qtest_start32

/* ---- high-linked 64-bit start ---- */
	.text
	.globl qtest_start64
	.type qtest_start64, @function
qtest_start64:
	lgdt	qtest_gdt_ptr(%rip)
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	qtest_stacks+QTEST_STACK_SIZE(%rip), %rsp
	pushq	$SEL_CODE64
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	/* zero .bss (the stack is in .bss but holds nothing live yet) */
	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	rep stosq
	xorl	%ebp, %ebp
	movl	%ebx, %edi		/* hvm_start_info physical address */
	call	qtest_main
3:	cli
	hlt
	jmp	3b
	.size qtest_start64, . - qtest_start64

/* ---- GDT (TSS descriptors are filled in by C) ---- */
	.data
	.balign 16
	.globl qtest_gdt
qtest_gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00cf9a000000ffff	/* 0x08 code32 */
	.quad 0x00af9a000000ffff	/* 0x10 code64 */
	.quad 0x00cf92000000ffff	/* 0x18 data */
	.fill 2 * QTEST_MAX_CPUS, 8, 0	/* 0x20.. 64-bit TSS descriptors */
qtest_gdt_end:
	.size qtest_gdt, . - qtest_gdt

	.balign 16
	.globl qtest_gdt_ptr
qtest_gdt_ptr:				/* lgdt in 64-bit mode: high base */
	.word qtest_gdt_end - qtest_gdt - 1
	.quad qtest_gdt
	.balign 16
	.globl qtest_gdt_ptr32
qtest_gdt_ptr32:			/* lgdt in 32-bit / real mode: physical base */
	.word qtest_gdt_end - qtest_gdt - 1
	.long PHYS(qtest_gdt)

/* ---- page tables ---- */
	.section .data.pgtable, "aw"
	.balign 4096
	.globl qtest_pml4
qtest_pml4:
	.quad PHYS(pdpt_low) + 0x3	/* [0] identity, removed after boot */
	.fill 510, 8, 0
	.quad PHYS(qtest_pdpt_high) + 0x3	/* [511] top 512 GiB */
pdpt_low:
	.quad PHYS(pd_low) + 0x3
	.fill 511, 8, 0
pd_low:
	.quad 0x83			/* phys 0..2 MiB, 2 MiB page, P|RW|PS */
	.fill 511, 8, 0
	.globl qtest_pdpt_high
qtest_pdpt_high:
	.fill 510, 8, 0
	.quad PHYS(qtest_pd_kernel) + 0x3	/* [510] 0xffffffff80000000.. */
	.quad 0					/* [511] 0xffffffffc0000000.. (module area) */
	.globl qtest_pd_kernel
qtest_pd_kernel:
	/* [0..15] 0xffffffff80000000.. -> phys 0..32 MiB, 2 MiB pages */
	.set .Li, 0
	.rept QTEST_KMAP_SIZE / 0x200000
	.quad (.Li * 0x200000) + 0x83
	.set .Li, .Li + 1
	.endr
	.fill 128 - QTEST_KMAP_SIZE / 0x200000, 8, 0	/* incl. QTEST_FAULT_HOLE */
	.quad PHYS(qtest_pt_4k) + 0x3		/* [128] 0xffffffff90000000 */
	.fill 511 - 128, 8, 0			/* [129..511] empty; [256..] is the module area */
	.globl qtest_pt_4k
qtest_pt_4k:
	.set .Li, 0
	.rept QTEST_4K_PAGES
	.quad qtest_4k_phys + (.Li * 0x1000) + 0x3
	.set .Li, .Li + 1
	.endr
	.fill 511 - QTEST_4K_PAGES, 8, 0
	.quad QTEST_LAPIC_PHYS + 0x13		/* [511] LAPIC, P|RW|PCD */

/* ---- the 4 KiB-mapped data area (linked at QTEST_4K_VA) ---- */
	.section .area4k, "aw"
	.set .Li, 0
	.rept QTEST_4K_PAGES
	.ascii "QT4KPAGE"			/* each page starts with "QT4KPAGE", */
	.quad .Li					/* its index, */
	.quad QTEST_4K_VA + .Li * 0x1000		/* its virtual address */
	.fill 4096 - 24, 1, 0
	.set .Li, .Li + 1
	.endr
