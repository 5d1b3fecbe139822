/* qtest: boot, command line, serial shell and memory mailbox */
#include "qtest.h"

volatile struct qtest_mailbox qtest_mailbox __attribute__((aligned(64)));
u64 qtest_pml4_ident_entry;
extern u64 qtest_pml4[512];

struct hvm_start_info {
	u32 magic;		/* 0x336ec578 */
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;	/* offset 24 */
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};
#define HVM_START_MAGIC 0x336ec578

static char cmdline[512];

static void read_start_info(u64 phys)
{
	if (!phys || phys + sizeof(struct hvm_start_info) > QTEST_PHYS_LIMIT) {
		kprintf("qtest: no usable hvm_start_info (0x%lx)\n", phys);
		return;
	}
	const struct hvm_start_info *si = phys_to_virt(phys);
	if (si->magic != HVM_START_MAGIC) {
		kprintf("qtest: bad hvm_start_info magic 0x%x\n", si->magic);
		return;
	}
	u64 p = si->cmdline_paddr;
	if (!p || p >= QTEST_PHYS_LIMIT - sizeof(cmdline))
		return;
	const char *s = phys_to_virt(p);
	size_t i;
	for (i = 0; i + 1 < sizeof(cmdline) && s[i]; i++)
		cmdline[i] = s[i];
	cmdline[i] = 0;
}

/* value of "key=value" on the command line, or NULL */
static const char *cmdline_get(const char *key, char *val, size_t n)
{
	size_t kl = strlen(key);
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *tok = p;
		while (*p && *p != ' ')
			p++;
		if ((size_t)(p - tok) > kl && !strncmp(tok, key, kl) && tok[kl] == '=') {
			size_t vl = (size_t)(p - tok) - kl - 1;
			if (vl >= n)
				vl = n - 1;
			memcpy(val, tok + kl + 1, vl);
			val[vl] = 0;
			return val;
		}
	}
	return NULL;
}

/* ---- mailbox: polled while the shell waits for input ---- */
static void mailbox_poll(void)
{
	u64 cmd = READ_ONCE(qtest_mailbox.cmd);
	if (!cmd)
		return;
	barrier();
	u64 arg = READ_ONCE(qtest_mailbox.arg), result;
	switch (cmd) {
	case MBOX_SELFCHECK:
		result = selfcheck_run(arg ? arg : 1, 1);
		break;
	case MBOX_HOT: {
		u64 cycles;
		result = hot_loop(arg, &cycles) ? ~0UL : cycles;
		break;
	}
	case MBOX_RUN: {
		u64 idx = arg >> 32, n = arg & 0xffffffff;
		result = idx < qtest_ntargets ? run_target((int)idx, n, 1) : ~0UL;
		break;
	}
	case MBOX_EXIT:
		qemu_exit((u32)arg);
	default:
		result = ~0UL;
	}
	WRITE_ONCE(qtest_mailbox.result, result);
	barrier();
	WRITE_ONCE(qtest_mailbox.cmd, 0);
	barrier();
	WRITE_ONCE(qtest_mailbox.done, qtest_mailbox.done + 1);
}

/* ---- shell ---- */
static int last_was_cr;

static size_t read_line(char *buf, size_t n)
{
	size_t len = 0;
	for (;;) {
		int ch = serial_getc();
		if (ch < 0) {
			mailbox_poll();
			cpu_relax();
			continue;
		}
		if (ch == '\n' && last_was_cr) {	/* CR LF counts once */
			last_was_cr = 0;
			continue;
		}
		last_was_cr = ch == '\r';
		if (ch == '\r' || ch == '\n') {
			serial_putc('\n');
			buf[len] = 0;
			return len;
		}
		if (ch == 0x7f || ch == 0x08) {
			if (len) {
				len--;
				kputs("\b \b");
			}
			continue;
		}
		if (ch < 0x20 || ch > 0x7e)
			continue;
		if (len + 1 < n) {
			buf[len++] = (char)ch;
			serial_putc((char)ch);
		}
	}
}

static int split(char *s, char **argv, int max)
{
	int argc = 0;
	while (*s && argc < max) {
		while (*s == ' ' || *s == '\t')
			*s++ = 0;
		if (!*s)
			break;
		argv[argc++] = s;
		while (*s && *s != ' ' && *s != '\t')
			s++;
	}
	return argc;
}

static int arg_u64(int argc, char **argv, int i, u64 dflt, u64 *out)
{
	if (i >= argc) {
		*out = dflt;
		return 0;
	}
	if (parse_u64(argv[i], out)) {
		kprintf("bad number: %s\n", argv[i]);
		return -1;
	}
	return 0;
}

static void cmd_counts(void)
{
	for (u64 t = 0; t < qtest_ntargets; t++)
		kprintf("%s %lu\n", qtest_targets[t].name, READ_ONCE(qtest_calls[t]));
	for (u64 i = 0; i < qtest_ncpus; i++) {
		struct qtest_cpu *c = &qtest_cpu_area[i];
		kprintf("cpu%lu int3=%lu stale_int3=%lu pf=%lu steps=%lu gs=%u\n", i, c->bp_count,
			c->bp_stale, c->pf_count, c->step_count, c->gs_counter);
	}
}

static void cmd_help(void)
{
	kputs("commands:\n"
	      "  selfcheck [N]   run the self-check N times (default 1)\n"
	      "  run NAME [N]    call target NAME N times (default 1), checked\n"
	      "  hot N           call t_hot N times, print the rdtsc delta\n"
	      "  counts          call counters per target, trap counters per cpu\n"
	      "  smp [N]         all cpus run the smp-safe targets N times (default 1)\n"
	      "  exit [CODE]     isa-debug-exit with CODE (default 0x10: QEMU exits 33)\n"
	      "  help\n");
}

static void shell(void)
{
	char line[256], copy[256];
	char *argv[8];
	for (;;) {
		kputs("qtest> ");
		read_line(line, sizeof(line));
		memcpy(copy, line, sizeof(copy));
		int argc = split(line, argv, 8);
		if (!argc)
			continue;
		u64 n;
		const char *cmd = argv[0];
		if (!strcmp(cmd, "selfcheck")) {
			if (!arg_u64(argc, argv, 1, 1, &n))
				selfcheck_run(n, 0);
		} else if (!strcmp(cmd, "run")) {
			if (argc < 2) {
				kputs("usage: run NAME [N]\n");
				continue;
			}
			int idx = target_index(argv[1]);
			if (idx < 0)
				kprintf("unknown target: %s\n", argv[1]);
			else if (!arg_u64(argc, argv, 2, 1, &n)) {
				run_target(idx, n, 1);
				kprintf("ran %s %lu\n", argv[1], n);
			}
		} else if (!strcmp(cmd, "hot")) {
			if (argc < 2) {
				kputs("usage: hot N\n");
				continue;
			}
			if (!arg_u64(argc, argv, 1, 1, &n)) {
				u64 cycles;
				if (hot_loop(n, &cycles))
					kputs("FAIL t_hot: wrong result in hot loop\n");
				kprintf("hot %lu done cycles=%lu\n", n, cycles);
			}
		} else if (!strcmp(cmd, "counts")) {
			cmd_counts();
		} else if (!strcmp(cmd, "smp")) {
			if (!arg_u64(argc, argv, 1, 1, &n))
				smp_command(n);
		} else if (!strcmp(cmd, "exit")) {
			if (!arg_u64(argc, argv, 1, QTEST_EXIT_SUCCESS, &n))
				qemu_exit((u32)n);
		} else if (!strcmp(cmd, "help")) {
			cmd_help();
		} else {
			kprintf("unknown command: %s\n", copy);
		}
	}
}

void qtest_main(u64 start_info_phys)
{
	cpu_setup(0);		/* GS base, TSS/IST, IDT */
	serial_init();
	read_start_info(start_info_phys);

	/* the identity map was only needed to jump high (smp.c reuses it briefly) */
	qtest_pml4_ident_entry = qtest_pml4[0];
	WRITE_ONCE(qtest_pml4[0], 0);
	write_cr3(read_cr3());

	outb(0x21, 0xff);	/* mask both PICs: no interrupt ever arrives */
	outb(0xa1, 0xff);
	kprintf("\nqtest: boot cmdline=\"%s\"\n", cmdline);
	lapic_init();
	pit_init();
	sti();
	smp_init();

	char val[32];
	u64 loops = 1;
	int autorun = 0;
	if (cmdline_get("qtest.loops", val, sizeof(val))) {
		if (parse_u64(val, &loops) || !loops)
			loops = 1;
		autorun = 1;
	}
	if (cmdline_get("qtest.auto", val, sizeof(val)) && !strcmp(val, "selfcheck"))
		autorun = 1;

	u64 failed = selfcheck_run(loops, 0);
	if (autorun)
		qemu_exit(failed ? QTEST_EXIT_FAILURE : QTEST_EXIT_SUCCESS);
	shell();
}
