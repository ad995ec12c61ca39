/* <stdlib.h> of tlc. */
#define NULL ((void *)0)
#define EXIT_SUCCESS 0
#define EXIT_FAILURE 1

void exit(int status);
int abs(int x);
int atoi(const char *s);
