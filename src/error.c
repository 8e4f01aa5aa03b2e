/*
 * error.c - the per-thread error message behind moe_fail().
 */
#include "moe_error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char error_text[512];

int moe_fail(int code, const char *format, ...)
{
    /* Format into a copy first: callers often pass moe_error_message() as
     * an argument to wrap the previous message with context. */
    char text[sizeof error_text];
    va_list args;
    va_start(args, format);
    vsnprintf(text, sizeof text, format, args);
    va_end(args);
    memcpy(error_text, text, sizeof text);
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
