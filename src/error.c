/*
 * error.c - the per-thread error message behind moe_fail().
 */
#include "moe_error.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char error_text[512];

int moe_fail(int code, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(error_text, sizeof error_text, format, args);
    va_end(args);
    return code;
}

const char *moe_error_message(void)
{
    return error_text;
}

void moe_error_clear(void)
{
    error_text[0] = '\0';
}
