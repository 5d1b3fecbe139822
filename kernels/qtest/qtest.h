/* qtest: shared C declarations */
#ifndef QTEST_H
#define QTEST_H

#include "abi.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef long s64;
typedef unsigned long size_t;
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_end __builtin_va_end
#define va_arg __builtin_va_arg

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
#define barrier() asm volatile("" ::: "memory")
#define STATIC_ASSERT(c) _Static_assert(c, #c)

#define X86_CF 0x0001UL
#define X86_PF 0x0004UL
#define X86_AF 0x0010UL
#define X86_ZF 0x0040UL
#define X86_SF 0x0080UL
#define X86_TF 0x0100UL
#define X86_IF 0x0200UL
#define X86_DF 0x0400UL
#define X86_OF 0x0800UL
#define X86_AC 0x40000UL

/* ---- port I/O, MSRs, control registers ---- */
static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	asm volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline u64 read_cr2(void) { u64 v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; asm volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { asm volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static inline u64 read_flags(void) { u64 f; asm volatile("pushfq; popq %0" : "=r"(f)); return f; }
static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }
static inline void cpu_relax(void) { asm volatile("pause" ::: "memory"); }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

#define virt_to_phys(p) ((u64)(p) - QTEST_KERNEL_BASE)
#define phys_to_virt(p) ((void *)((u64)(p) + QTEST_KERNEL_BASE))

/* ---- per-CPU area; offsets are in abi.h for the assembly ---- */
struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct qtest_cpu {
	struct qtest_cpu *self;
	u64 cpu_id;
	u32 gs_counter;
	u32 pad0;
	u64 gs_sum;
	u64 gs_aux;
	u64 trec;
	u64 trsp;
	u64 step_active;
	u64 step_count;
	u64 step_rip;
	u64 dr6;
	u64 bp_count;
	u64 bp_rip;
	u64 pf_count;
	u64 pf_cr2;
	u64 pf_rip;
	u64 apic_id;
	/* C-only below */
	u64 bp_stale;		/* int3 hits whose int3 was gone when handled */
	u64 online;
	u64 job_seen;
	u64 de_count;		/* #DE fixed up through the exception table */
	u64 de_rip;		/* faulting rip of the last fixed-up #DE */
	struct tss tss __attribute__((aligned(16)));
} __attribute__((aligned(64)));

extern struct qtest_cpu qtest_percpu;			/* template: never live */
extern struct qtest_cpu qtest_cpu_area[QTEST_MAX_CPUS];	/* one per CPU */

static inline struct qtest_cpu *this_cpu(void)
{
	struct qtest_cpu *p;
	asm volatile("movq %%gs:qtest_percpu(%%rip), %0" : "=r"(p));
	return p;
}

/* ---- target table (assembly) ---- */
struct qtest_target {
	const char *name;
	u64 addr;
	u64 size;
	u64 flags;
};
extern const struct qtest_target qtest_targets[];
extern const u64 qtest_ntargets;
extern u64 qtest_calls[QTEST_NTARGETS];
extern const u64 qtest_int3_sites[], qtest_int3_sites_end[];
struct extable_entry { u64 insn, fixup; };
extern const struct extable_entry qtest_extable[], qtest_extable_end[];
extern const u64 qtest_step_range[2];

struct qtest_mailbox {
	u64 cmd;
	u64 arg;
	u64 done;
	u64 result;
};
extern volatile struct qtest_mailbox qtest_mailbox;

/* ---- console.c ---- */
void serial_init(void);
void serial_putc(char c);
int serial_getc(void);		/* -1 if none */
void kputs(const char *s);
int kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int ksnprintf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int kvsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
void console_lock(void);
void console_unlock(void);

/* ---- lib.c ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
int parse_u64(const char *s, u64 *out);
void qemu_exit(u32 v) __attribute__((noreturn));

/* ---- traps.c ---- */
void cpu_setup(int cpu);
extern volatile u64 qtest_unexpected_count;

/* ---- selfcheck.c ---- */
struct ctx {
	char why[200];
	int smp;
};
u64 selfcheck_run(u64 rounds, int quiet);	/* returns failed targets */
int target_index(const char *name);
int target_check(struct ctx *c, int idx, u64 iter);
u64 run_target(int idx, u64 n, int print_fail);
u64 hot_loop(u64 n, u64 *cycles);
int smp_work(struct ctx *c, u64 n);
void target_counts_snapshot(u64 *out);

/* ---- smp.c ---- */
extern volatile u64 qtest_ncpus;
void lapic_init(void);
void lapic_eoi(void);
void smp_init(void);
void smp_command(u64 n);
void pit_init(void);
void delay_us(u64 us);
u64 fw_cfg_ncpus(void);

#endif
