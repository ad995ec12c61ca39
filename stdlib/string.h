/* <string.h> of tlc. Sizes are unsigned int, the 32-bit size type of tlc. */
#define NULL ((void *)0)

void *memset(void *s, int c, unsigned n);
void *memcpy(void *destination, const void *source, unsigned n);
unsigned strlen(const char *s);
int strcmp(const char *a, const char *b);
