/* qtest: per-CPU setup (GS base, TSS with IST stacks, IDT) and trap handlers */
#include "qtest.h"

struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};

struct idt_gate {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off1;
	u32 off2;
	u32 reserved;
} __attribute__((packed));

struct idt_gate qtest_idt[256] __attribute__((aligned(4096)));
static struct {
	u16 limit;
	u64 base;
} __attribute__((packed)) idt_ptr;

/* per-CPU state: template (never live) and the live areas */
struct qtest_cpu qtest_percpu __attribute__((section(".data"), aligned(4096)));
struct qtest_cpu qtest_cpu_area[QTEST_MAX_CPUS] __attribute__((aligned(4096)));

/* stacks */
u8 qtest_stacks[QTEST_MAX_CPUS][QTEST_STACK_SIZE] __attribute__((aligned(4096)));
static u8 ist_stacks[QTEST_MAX_CPUS][3][QTEST_IST_SIZE] __attribute__((aligned(4096)));

extern u8 qtest_vector_stubs_begin[];
extern u64 qtest_gdt[GDT_ENTRIES];
extern u8 _text[], _etext[];

volatile u64 qtest_unexpected_count;

static void idt_build(void)
{
	for (int v = 0; v < 256; v++) {
		u64 a = (u64)qtest_vector_stubs_begin + 16 * v;
		struct idt_gate *g = &qtest_idt[v];
		g->off0 = (u16)a;
		g->sel = SEL_CODE64;
		g->ist = v == 1 ? IST_DB : v == 2 ? IST_NMI : v == 8 ? IST_DF : 0;
		g->type = 0x8e;		/* present, DPL 0, 64-bit interrupt gate */
		g->off1 = (u16)(a >> 16);
		g->off2 = (u32)(a >> 32);
		g->reserved = 0;
	}
	idt_ptr.limit = sizeof(qtest_idt) - 1;
	idt_ptr.base = (u64)qtest_idt;
}

static void tss_install(int cpu)
{
	struct tss *t = &qtest_cpu_area[cpu].tss;
	memset(t, 0, sizeof(*t));
	for (int i = 0; i < 3; i++)
		t->ist[i] = (u64)&ist_stacks[cpu][i][QTEST_IST_SIZE];
	t->rsp[0] = (u64)&qtest_stacks[cpu][QTEST_STACK_SIZE];
	t->iomap_base = sizeof(*t);

	u64 base = (u64)t, limit = sizeof(*t) - 1;
	int slot = (SEL_TSS0 >> 3) + 2 * cpu;
	qtest_gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
			  (0x89UL << 40) /* present, 64-bit TSS (available) */ |
			  (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	qtest_gdt[slot + 1] = base >> 32;
	u16 sel = (u16)(slot << 3);
	asm volatile("ltr %0" :: "r"(sel));
}

/* GS base, TSS, IDT for this CPU (cpu 0 also builds the IDT) */
void cpu_setup(int cpu)
{
	struct qtest_cpu *c = &qtest_cpu_area[cpu];
	c->self = c;
	c->cpu_id = cpu;
	wrmsr(0xc0000101, (u64)c - (u64)&qtest_percpu);	/* IA32_GS_BASE */
	if (cpu == 0)
		idt_build();
	tss_install(cpu);
	asm volatile("lidt %0" :: "m"(idt_ptr));
}

/* ---- handlers ---- */

static void unexpected(struct trap_frame *f)
{
	__atomic_add_fetch(&qtest_unexpected_count, 1, __ATOMIC_RELAXED);
	struct qtest_cpu *c = this_cpu();
	kprintf("qtest: unexpected exception %lu at rip=0x%lx err=0x%lx cr2=0x%lx\n",
		f->vector, f->rip, f->error, read_cr2());
	kprintf("qtest: cpu=%lu cs=0x%lx rflags=0x%lx rsp=0x%lx ss=0x%lx\n",
		c ? c->cpu_id : 0, f->cs, f->rflags, f->rsp, f->ss);
	kprintf("qtest: rax=0x%lx rbx=0x%lx rcx=0x%lx rdx=0x%lx rsi=0x%lx rdi=0x%lx\n",
		f->rax, f->rbx, f->rcx, f->rdx, f->rsi, f->rdi);
	kprintf("qtest: rbp=0x%lx r8=0x%lx r9=0x%lx r10=0x%lx r11=0x%lx\n",
		f->rbp, f->r8, f->r9, f->r10, f->r11);
	kprintf("qtest: r12=0x%lx r13=0x%lx r14=0x%lx r15=0x%lx\n",
		f->r12, f->r13, f->r14, f->r15);
	qemu_exit(QTEST_EXIT_FAILURE);
}

/*
 * #BP: the kernel's own int3 sites only (a kgdb-like hook); rip = site + 1.
 * Like Linux's kprobe_int3_handler, an int3 that is no longer in memory
 * (removed by someone else after it was hit) is not an error: back up and
 * run the original instruction.  Any other int3 is unexpected.
 */
static int handle_bp(struct trap_frame *f)
{
	struct qtest_cpu *c = this_cpu();
	for (const u64 *s = qtest_int3_sites; s < qtest_int3_sites_end; s++) {
		if (f->rip == *s + 1) {
			c->bp_rip = f->rip;
			c->bp_count++;
			return 1;
		}
	}
	u64 addr = f->rip - 1;
	if (addr >= (u64)_text && addr < (u64)_etext && *(volatile u8 *)addr != 0xcc) {
		c->bp_stale++;
		f->rip = addr;
		return 1;
	}
	return 0;
}

/* #PF: exception table, like Linux's ex_handler_default */
static int handle_pf(struct trap_frame *f)
{
	u64 cr2 = read_cr2();
	for (const struct extable_entry *e = qtest_extable; e < qtest_extable_end; e++) {
		if (f->rip == e->insn) {
			struct qtest_cpu *c = this_cpu();
			c->pf_cr2 = cr2;
			c->pf_rip = f->rip;
			c->pf_count++;
			f->rip = e->fixup;
			return 1;
		}
	}
	return 0;
}

/* #DE: exception table, as for #PF (t_div) */
static int handle_de(struct trap_frame *f)
{
	for (const struct extable_entry *e = qtest_extable; e < qtest_extable_end; e++) {
		if (f->rip == e->insn) {
			struct qtest_cpu *c = this_cpu();
			c->de_rip = f->rip;
			c->de_count++;
			f->rip = e->fixup;
			return 1;
		}
	}
	return 0;
}

/* #DB: single steps the guest asked for itself (t_self_step) */
static int handle_db(struct trap_frame *f)
{
	struct qtest_cpu *c = this_cpu();
	u64 dr6;
	asm volatile("mov %%dr6, %0" : "=r"(dr6));
	asm volatile("mov %0, %%dr6" :: "r"(0xffff0ff0UL));
	c->dr6 = dr6;
	if (!c->step_active)
		return 0;
	if (f->rip < qtest_step_range[0] || f->rip > qtest_step_range[1])
		return 0;
	c->step_count++;
	c->step_rip = f->rip;
	if (f->rip == qtest_step_range[1]) {
		f->rflags &= ~X86_TF;
		c->step_active = 0;
	}
	return 1;
}

void qtest_trap(struct trap_frame *f)
{
	switch (f->vector) {
	case 0:
		if (handle_de(f))
			return;
		break;
	case 1:
		if (handle_db(f))
			return;
		break;
	case 3:
		if (handle_bp(f))
			return;
		break;
	case 14:
		if (handle_pf(f))
			return;
		break;
	case VEC_WAKE:
		lapic_eoi();
		return;
	case VEC_SPURIOUS:
		return;
	}
	unexpected(f);
}
