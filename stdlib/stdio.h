/* <stdio.h> of tlc: output and input go through the machine's memory-mapped ports. */
#define EOF (-1)
#define NULL ((void *)0)

int putchar(int c);
int getchar(void);
int puts(const char *s);
/* The format must be a string literal; the compiler expands it into calls. */
int printf(const char *format, ...);
