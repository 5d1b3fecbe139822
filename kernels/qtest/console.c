/* qtest: COM1 serial console (polling) and printf */
#include "qtest.h"

#define COM1 0x3f8

void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts */
	outb(COM1 + 3, 0x80);	/* DLAB */
	outb(COM1 + 0, 0x01);	/* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1 */
	/* FCR untouched: changing it would flush input that is already queued */
	outb(COM1 + 4, 0x03);	/* DTR | RTS */
}

static void serial_raw(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		cpu_relax();
	outb(COM1, (u8)c);
}

void serial_putc(char c)
{
	if (c == '\n')
		serial_raw('\r');
	serial_raw(c);
}

int serial_getc(void)
{
	if (inb(COM1 + 5) & 0x01)
		return inb(COM1);
	return -1;
}

/* one printer at a time; re-entrant on the same CPU (exception while printing) */
static volatile u64 con_owner = ~0UL;
static u64 con_depth;

void console_lock(void)
{
	struct qtest_cpu *c = this_cpu();
	u64 me = c ? c->cpu_id : 0;
	if (READ_ONCE(con_owner) == me) {
		con_depth++;
		return;
	}
	for (u64 spins = 0;; spins++) {
		u64 expected = ~0UL;
		if (__atomic_compare_exchange_n(&con_owner, &expected, me, 0,
						__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			break;
		cpu_relax();
	}
	con_depth = 1;
}

void console_unlock(void)
{
	if (--con_depth == 0)
		__atomic_store_n(&con_owner, ~0UL, __ATOMIC_RELEASE);
}

void kputs(const char *s)
{
	console_lock();
	while (*s)
		serial_putc(*s++);
	console_unlock();
}

/* ---- formatting: %[0][width][l|ll|z]{d,u,x,s,c,p,%} ---- */
struct sink {
	char *buf;
	size_t n, len;
};

static void sink_put(struct sink *s, char c)
{
	if (s->buf) {
		if (s->len + 1 < s->n)
			s->buf[s->len] = c;
	} else {
		serial_putc(c);
	}
	s->len++;
}

static void put_num(struct sink *s, u64 v, int base, int neg, int width, char pad)
{
	char tmp[24];
	int i = 0;
	do {
		int d = (int)(v % base);
		tmp[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		tmp[i++] = '-';
	while (i < width--)
		sink_put(s, pad);
	while (i)
		sink_put(s, tmp[--i]);
}

static void format(struct sink *s, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			sink_put(s, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, lng = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
			put_num(s, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad);
			break;
		}
		case 'u':
			put_num(s, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, 0, width, pad);
			break;
		case 'x':
			put_num(s, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, 0, width, pad);
			break;
		case 'p':
			sink_put(s, '0');
			sink_put(s, 'x');
			put_num(s, (u64)va_arg(ap, void *), 16, 0, width, pad);
			break;
		case 's': {
			const char *str = va_arg(ap, const char *);
			int len = (int)strlen(str ? str : "(null)");
			while (len < width--)
				sink_put(s, ' ');
			for (str = str ? str : "(null)"; *str; str++)
				sink_put(s, *str);
			break;
		}
		case 'c':
			sink_put(s, (char)va_arg(ap, int));
			break;
		case '%':
			sink_put(s, '%');
			break;
		case 0:
			return;
		default:
			sink_put(s, '%');
			sink_put(s, *fmt);
		}
	}
}

int kvsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
	struct sink s = { buf, n, 0 };
	format(&s, fmt, ap);
	if (n)
		buf[s.len < n ? s.len : n - 1] = 0;
	return (int)s.len;
}

int ksnprintf(char *buf, size_t n, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int r = kvsnprintf(buf, n, fmt, ap);
	va_end(ap);
	return r;
}

int kprintf(const char *fmt, ...)
{
	struct sink s = { NULL, 0, 0 };
	va_list ap;
	va_start(ap, fmt);
	console_lock();
	format(&s, fmt, ap);
	console_unlock();
	va_end(ap);
	return (int)s.len;
}
