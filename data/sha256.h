/* SHA-256 (FIPS 180-4), enough to name a tokenizer.json by its contents in shard attributes. */
#ifndef QWEN3_SHA256_H
#define QWEN3_SHA256_H

#include <stddef.h>

/* Writes the digest of data[0..len) as 64 lowercase hex digits and a NUL into hex. */
void sha256_hex(const void *data, size_t len, char hex[65]);

#endif
