/*
 * qtest: LAPIC, PIT delays, fw_cfg CPU count, AP bring-up (INIT-SIPI-SIPI
 * through a real-mode trampoline at QTEST_AP_TRAMP_PHYS) and the smp command.
 */
#include "qtest.h"

#define LAPIC_ID     0x020
#define LAPIC_EOI    0x0b0
#define LAPIC_SVR    0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_ERROR 0x370
#define ICR_BUSY     (1u << 12)

volatile u64 qtest_ncpus = 1;
u64 qtest_ap_stack_top;		/* read by qtest_ap_start64 */
u32 qtest_ap_cpu;

extern u8 qtest_ap_tramp_begin[], qtest_ap_tramp_end[];
extern u64 qtest_pml4[512];
extern u64 qtest_pml4_ident_entry;	/* saved by main.c */
extern u8 qtest_stacks[QTEST_MAX_CPUS][QTEST_STACK_SIZE];

static int lapic_ok;
static volatile u64 ap_go;

static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(QTEST_LAPIC_VA + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(QTEST_LAPIC_VA + reg) = v; }

void lapic_init(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	if (!(d & (1 << 9)))
		return;
	u64 base = rdmsr(0x1b);	/* IA32_APIC_BASE */
	if ((base & ~0xfffUL) != QTEST_LAPIC_PHYS)
		return;
	if (!(base & 0x800))
		wrmsr(0x1b, base | 0x800);
	lapic_write(LAPIC_LVT_TIMER, 0x10000);	/* masked: no timer interrupts */
	lapic_write(LAPIC_LVT_LINT0, 0x10000);
	lapic_write(LAPIC_LVT_ERROR, 0x10000);
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	this_cpu()->apic_id = lapic_read(LAPIC_ID) >> 24;
	lapic_ok = 1;
}

void lapic_eoi(void)
{
	lapic_write(LAPIC_EOI, 0);
}

static void lapic_icr(u32 apic_id, u32 lo)
{
	while (lapic_read(LAPIC_ICR_LO) & ICR_BUSY)
		cpu_relax();
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, lo);
	while (lapic_read(LAPIC_ICR_LO) & ICR_BUSY)
		cpu_relax();
}

/* ---- PIT channel 0 as a free-running clock (IRQ 0 is masked at the PIC) ---- */
void pit_init(void)
{
	outb(0x43, 0x34);	/* channel 0, lo/hi, mode 2, binary */
	outb(0x40, 0);
	outb(0x40, 0);		/* reload 65536 */
}

static u16 pit_read(void)
{
	outb(0x43, 0x00);	/* latch channel 0 */
	u8 lo = inb(0x40);
	u8 hi = inb(0x40);
	return (u16)(lo | (hi << 8));
}

void delay_us(u64 us)
{
	u64 ticks = us * 1193182 / 1000000 + 1, elapsed = 0;
	u16 last = pit_read();
	while (elapsed < ticks) {
		u16 now = pit_read();
		elapsed += (u16)(last - now);
		last = now;
		cpu_relax();
	}
}

/* number of CPUs QEMU was started with (fw_cfg FW_CFG_NB_CPUS), 0 if unknown */
u64 fw_cfg_ncpus(void)
{
	char sig[4];
	outw(0x510, 0x0000);
	for (int i = 0; i < 4; i++)
		sig[i] = (char)inb(0x511);
	if (memcmp(sig, "QEMU", 4))
		return 0;
	outw(0x510, 0x0005);
	u16 lo = inb(0x511), hi = inb(0x511);
	return lo | (hi << 8);
}

/* ---- the smp job the APs run when woken ---- */
static volatile u64 job_gen, job_n;
static volatile u64 job_done[QTEST_MAX_CPUS];
static volatile int job_result[QTEST_MAX_CPUS];
static char job_why[QTEST_MAX_CPUS][200];

static void ap_idle(int cpu)
{
	struct qtest_cpu *me = &qtest_cpu_area[cpu];
	for (;;) {
		cli();
		u64 g = READ_ONCE(job_gen);
		if (g != me->job_seen) {
			sti();
			me->job_seen = g;
			struct ctx c = { .smp = 1 };
			int r = smp_work(&c, READ_ONCE(job_n));
			memcpy(job_why[cpu], c.why, sizeof(job_why[cpu]));
			job_result[cpu] = r;
			__atomic_store_n(&job_done[cpu], g, __ATOMIC_RELEASE);
			continue;
		}
		asm volatile("sti; hlt" ::: "memory");	/* woken by VEC_WAKE */
	}
}

void qtest_ap_main(u32 cpu)
{
	cpu_setup((int)cpu);
	lapic_init();
	__atomic_store_n(&qtest_cpu_area[cpu].online, 1, __ATOMIC_RELEASE);
	while (!READ_ONCE(ap_go))
		cpu_relax();
	write_cr3(read_cr3());	/* drop the identity entries the trampoline used */
	sti();
	ap_idle((int)cpu);
}

void smp_init(void)
{
	u64 n = fw_cfg_ncpus();
	u64 want = n ? n : 2;	/* unknown: try one AP */
	if (want > QTEST_MAX_CPUS)
		want = QTEST_MAX_CPUS;
	if (!lapic_ok || this_cpu()->apic_id != 0)
		want = 1;
	if (want > 1) {
		u64 tsize = qtest_ap_tramp_end - qtest_ap_tramp_begin;
		memcpy(phys_to_virt(QTEST_AP_TRAMP_PHYS), qtest_ap_tramp_begin, tsize);
		WRITE_ONCE(qtest_pml4[0], qtest_pml4_ident_entry);
		for (u64 cpu = 1; cpu < want; cpu++) {
			u32 apic = (u32)cpu;	/* QEMU numbers APIC IDs 0..n-1 */
			qtest_ap_cpu = (u32)cpu;
			qtest_ap_stack_top = (u64)&qtest_stacks[cpu][QTEST_STACK_SIZE];
			barrier();
			lapic_icr(apic, 0x4500);			/* INIT */
			delay_us(10000);
			u32 sipi = 0x4600 | (QTEST_AP_TRAMP_PHYS >> 12);
			lapic_icr(apic, sipi);				/* SIPI */
			delay_us(200);
			if (!READ_ONCE(qtest_cpu_area[cpu].online))
				lapic_icr(apic, sipi);			/* SIPI again */
			for (int ms = 0; ms < 100 && !READ_ONCE(qtest_cpu_area[cpu].online); ms++)
				delay_us(1000);
			if (!READ_ONCE(qtest_cpu_area[cpu].online)) {
				lapic_icr(apic, 0x4500);	/* park it again */
				kprintf("qtest: cpu %lu did not start\n", cpu);
				break;
			}
			qtest_ncpus = cpu + 1;
		}
		WRITE_ONCE(qtest_pml4[0], 0);
		write_cr3(read_cr3());
		WRITE_ONCE(ap_go, 1);
	}
	kprintf("qtest: cpus=%lu\n", qtest_ncpus);
}

void smp_command(u64 n)
{
	u64 ncpus = qtest_ncpus;
	if (ncpus == 1)
		kputs("smp: 1 cpu\n");
	u64 before[QTEST_NTARGETS], after[QTEST_NTARGETS];
	u32 gs_before[QTEST_MAX_CPUS];
	for (u64 i = 0; i < ncpus; i++)
		gs_before[i] = READ_ONCE(qtest_cpu_area[i].gs_counter);
	target_counts_snapshot(before);

	WRITE_ONCE(job_n, n);
	barrier();
	u64 g = READ_ONCE(job_gen) + 1;
	WRITE_ONCE(job_gen, g);
	for (u64 i = 1; i < ncpus; i++)
		lapic_icr((u32)qtest_cpu_area[i].apic_id, VEC_WAKE);	/* fixed, physical */

	struct ctx c = { .smp = 1 };
	int r = smp_work(&c, n);
	for (u64 i = 1; i < ncpus; i++)
		while (__atomic_load_n(&job_done[i], __ATOMIC_ACQUIRE) != g)
			cpu_relax();

	char why[240];
	why[0] = 0;
	if (r)
		ksnprintf(why, sizeof(why), "cpu0: %s", c.why);
	for (u64 i = 1; i < ncpus && !why[0]; i++)
		if (job_result[i])
			ksnprintf(why, sizeof(why), "cpu%lu: %s", i, job_why[i]);
	target_counts_snapshot(after);
	for (u64 t = 0; t < qtest_ntargets && !why[0]; t++) {
		if (!(qtest_targets[t].flags & TFLAG_SMP))
			continue;
		if (after[t] - before[t] != n * ncpus)
			ksnprintf(why, sizeof(why), "%s call counter went up by %lu, expected %lu",
				  qtest_targets[t].name, after[t] - before[t], n * ncpus);
	}
	for (u64 i = 0; i < ncpus && !why[0]; i++) {
		u32 d = READ_ONCE(qtest_cpu_area[i].gs_counter) - gs_before[i];
		if (d != (u32)n)
			ksnprintf(why, sizeof(why), "cpu%lu per-CPU counter went up by %u, expected %lu",
				  i, d, n);
	}
	if (why[0])
		kprintf("smp %lu cpus=%lu FAIL: %s\n", n, ncpus, why);
	else
		kprintf("smp %lu cpus=%lu ok\n", n, ncpus);
}
