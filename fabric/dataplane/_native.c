/* fabric.dataplane._native: the AEAD of a batch of data datagrams in one call.
 *
 * The interface and its pure-Python twin are in fabric/dataplane/aead.py (read it
 * first): a Layout says where a protocol puts its header, counter, AAD and tag;
 * BatchAead(cipher, key, layout, prefix, suffix) opens and seals whole batches.
 *
 * Through OpenSSL's EVP API (EVP_EncryptInit_ex(3)): each object holds two cipher
 * contexts, keyed once (one to encrypt, one to decrypt); per datagram only the
 * nonce is set, so the key schedule and the context are reused, unlike the one-shot
 * APIs that build a context per call. Ciphers: ChaCha20-Poly1305 (RFC 8439 2.8),
 * AES-GCM (NIST SP 800-38D), with 96-bit nonces and 128-bit tags.
 *
 * The GIL is held throughout: one object's contexts are never used by two threads
 * at once, and results go straight into new bytes objects.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#define TAG 16       /* the Poly1305 / GCM tag */
#define NONCE 12     /* RFC 8439 2.8, SP 800-38D 8.2.1: 96 bits */
#define MAX_PAD 256  /* Layout.pad is 1..MAX_PAD */
#define MAX_HEADER 65535

static const unsigned char ZEROS[MAX_PAD];

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;   /* keyed for encryption */
    EVP_CIPHER_CTX *dec;   /* keyed for decryption */
    PyObject *cipher;      /* str, as given */
    PyObject *layout;      /* the Layout, as given */
    PyObject *empty;       /* bytes: the plaintext that replaces an empty packet */
    Py_ssize_t header, counter_at, counter_len, aad_from, aad_to, pad;
    int tag_first;
    unsigned char prefix[NONCE], suffix[NONCE];
    Py_ssize_t prefix_len, suffix_len;
} AeadObject;

/* An OpenSSL call failed where it should not (not a tag mismatch): an exception. */
static void
openssl_error(const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[256] = "";
    if (e)
        ERR_error_string_n(e, buf, sizeof(buf));
    ERR_clear_error();
    PyErr_Format(PyExc_RuntimeError, "OpenSSL: %s failed%s%s", what, e ? ": " : "", buf);
}

/* One integer attribute of the layout, into *out; -1 with an exception if absent
 * or not an int. */
static int
layout_int(PyObject *layout, const char *name, Py_ssize_t *out)
{
    PyObject *v = PyObject_GetAttrString(layout, name);
    if (v == NULL)
        return -1;
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "layout.%s must be an int", name);
        Py_DECREF(v);
        return -1;
    }
    *out = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "layout.%s is out of range", name);
        return -1;
    }
    return 0;
}

/* Read and check the layout (aead.Layout checks the same in Python). */
static int
read_layout(AeadObject *self, PyObject *layout)
{
    PyObject *v;
    int truth;

    if (layout_int(layout, "header", &self->header) < 0
        || layout_int(layout, "counter_at", &self->counter_at) < 0
        || layout_int(layout, "counter_len", &self->counter_len) < 0
        || layout_int(layout, "aad_from", &self->aad_from) < 0
        || layout_int(layout, "aad_to", &self->aad_to) < 0
        || layout_int(layout, "pad", &self->pad) < 0)
        return -1;
    if ((v = PyObject_GetAttrString(layout, "tag_first")) == NULL)
        return -1;
    truth = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (truth < 0)
        return -1;
    self->tag_first = truth;
    if ((v = PyObject_GetAttrString(layout, "empty")) == NULL)
        return -1;
    if (!PyBytes_CheckExact(v)) {
        Py_DECREF(v);
        PyErr_SetString(PyExc_TypeError, "layout.empty must be bytes");
        return -1;
    }
    self->empty = v;

    if (self->header < 0 || self->header > MAX_HEADER) {
        PyErr_SetString(PyExc_ValueError, "layout.header must be 0..65535");
        return -1;
    }
    if (self->counter_len != 4 && self->counter_len != 8) {
        PyErr_SetString(PyExc_ValueError, "layout.counter_len must be 4 or 8");
        return -1;
    }
    if (self->counter_at < 0 || self->counter_at > self->header - self->counter_len) {
        PyErr_SetString(PyExc_ValueError, "layout.counter_at: the counter must lie in the header");
        return -1;
    }
    if (self->aad_from < 0 || self->aad_from > self->aad_to || self->aad_to > self->header) {
        PyErr_SetString(PyExc_ValueError, "layout.aad_from..aad_to must lie in the header");
        return -1;
    }
    if (self->pad < 1 || self->pad > MAX_PAD) {
        PyErr_SetString(PyExc_ValueError, "layout.pad must be 1..256");
        return -1;
    }
    return 0;
}

/* A context keyed once for one direction, with 96-bit nonces. */
static EVP_CIPHER_CTX *
keyed_context(const EVP_CIPHER *cipher, const unsigned char *key, int encrypt)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        openssl_error("EVP_CIPHER_CTX_new");
        return NULL;
    }
    if (!EVP_CipherInit_ex(ctx, cipher, NULL, NULL, NULL, encrypt)) {
        openssl_error("EVP_CipherInit_ex (cipher)");
    } else if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, NONCE, NULL)) {
        openssl_error("EVP_CTRL_AEAD_SET_IVLEN");
    } else if (!EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, encrypt)) {
        openssl_error("EVP_CipherInit_ex (key)");
    } else {
        return ctx;
    }
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

static void
Aead_dealloc(AeadObject *self)
{
    EVP_CIPHER_CTX_free(self->enc);  /* NULL is a no-op; frees (and cleanses) the key */
    EVP_CIPHER_CTX_free(self->dec);
    Py_XDECREF(self->cipher);
    Py_XDECREF(self->layout);
    Py_XDECREF(self->empty);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Aead_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"cipher", "key", "layout", "prefix", "suffix", NULL};
    PyObject *cipher_name, *layout;
    Py_buffer key = {0}, prefix = {0}, suffix = {0};
    const EVP_CIPHER *cipher;
    Py_ssize_t key_len;
    AeadObject *self = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Uy*Oy*y*:BatchAead", kwlist,
                                     &cipher_name, &key, &layout, &prefix, &suffix))
        return NULL;
    if (PyUnicode_CompareWithASCIIString(cipher_name, "CHACHA20-POLY1305") == 0) {
        cipher = EVP_chacha20_poly1305();
        key_len = 32;
    } else if (PyUnicode_CompareWithASCIIString(cipher_name, "AES-256-GCM") == 0) {
        cipher = EVP_aes_256_gcm();
        key_len = 32;
    } else if (PyUnicode_CompareWithASCIIString(cipher_name, "AES-128-GCM") == 0) {
        cipher = EVP_aes_128_gcm();
        key_len = 16;
    } else {
        PyErr_Format(PyExc_ValueError, "unknown cipher %R (CHACHA20-POLY1305, AES-256-GCM, AES-128-GCM)",
                     cipher_name);
        goto done;
    }
    if (key.len != key_len) {
        PyErr_Format(PyExc_ValueError, "%U takes a %zd-byte key, not %zd", cipher_name, key_len, key.len);
        goto done;
    }
    if ((self = (AeadObject *)type->tp_alloc(type, 0)) == NULL)
        goto done;
    if (read_layout(self, layout) < 0)
        goto fail;
    if (prefix.len + self->counter_len + suffix.len != NONCE) {
        PyErr_SetString(PyExc_ValueError, "the nonce prefix, counter and suffix must make 12 bytes");
        goto fail;
    }
    memcpy(self->prefix, prefix.buf, (size_t)prefix.len);
    memcpy(self->suffix, suffix.buf, (size_t)suffix.len);
    self->prefix_len = prefix.len;
    self->suffix_len = suffix.len;
    if ((self->enc = keyed_context(cipher, key.buf, 1)) == NULL
        || (self->dec = keyed_context(cipher, key.buf, 0)) == NULL)
        goto fail;
    self->cipher = Py_NewRef(cipher_name);
    self->layout = Py_NewRef(layout);
    goto done;
fail:
    Py_CLEAR(self);
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&suffix);
    return (PyObject *)self;
}

/* The counter at p: little-endian 64 bits (WireGuard 5.4.6) or big-endian 32 (OpenVPN). */
static uint64_t
read_counter(const AeadObject *self, const unsigned char *p)
{
    uint64_t c = 0;
    if (self->counter_len == 8) {
        for (int i = 7; i >= 0; i--)
            c = (c << 8) | p[i];
    } else {
        for (int i = 0; i < 4; i++)
            c = (c << 8) | p[i];
    }
    return c;
}

static void
write_counter(const AeadObject *self, unsigned char *p, uint64_t c)
{
    if (self->counter_len == 8) {
        for (int i = 0; i < 8; i++, c >>= 8)
            p[i] = (unsigned char)c;
    } else {
        for (int i = 3; i >= 0; i--, c >>= 8)
            p[i] = (unsigned char)c;
    }
}

/* nonce = prefix || the counter's bytes as on the wire || suffix */
static void
make_nonce(const AeadObject *self, const unsigned char *counter, unsigned char nonce[NONCE])
{
    memcpy(nonce, self->prefix, (size_t)self->prefix_len);
    memcpy(nonce + self->prefix_len, counter, (size_t)self->counter_len);
    memcpy(nonce + self->prefix_len + self->counter_len, self->suffix, (size_t)self->suffix_len);
}

/* Open one datagram: *plain is the plaintext, or NULL if too short or the tag
 * fails. Returns -1 with an exception only for an OpenSSL or memory error. */
static int
open_one(AeadObject *self, const unsigned char *d, Py_ssize_t len, PyObject **plain, uint64_t *counter)
{
    EVP_CIPHER_CTX *ctx = self->dec;
    unsigned char nonce[NONCE], scratch[TAG];
    const unsigned char *ct, *tag;
    Py_ssize_t ct_len = len - self->header - TAG;
    int outl;
    PyObject *pt;

    *plain = NULL;
    *counter = 0;
    if (ct_len < 0 || ct_len > INT_MAX)
        return 0;
    *counter = read_counter(self, d + self->counter_at);
    make_nonce(self, d + self->counter_at, nonce);
    if (self->tag_first) {
        tag = d + self->header;
        ct = tag + TAG;
    } else {
        ct = d + self->header;
        tag = ct + ct_len;
    }
    if ((pt = PyBytes_FromStringAndSize(NULL, ct_len)) == NULL)
        return -1;
    if (!EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce)) {
        Py_DECREF(pt);
        openssl_error("EVP_DecryptInit_ex (nonce)");
        return -1;
    }
    if (self->aad_to > self->aad_from
        && !EVP_DecryptUpdate(ctx, NULL, &outl, d + self->aad_from, (int)(self->aad_to - self->aad_from))) {
        Py_DECREF(pt);
        openssl_error("EVP_DecryptUpdate (AAD)");
        return -1;
    }
    if (ct_len > 0
        && (!EVP_DecryptUpdate(ctx, (unsigned char *)PyBytes_AS_STRING(pt), &outl, ct, (int)ct_len)
            || outl != ct_len)) {
        Py_DECREF(pt);
        openssl_error("EVP_DecryptUpdate");
        return -1;
    }
    if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG, (void *)tag)) {
        Py_DECREF(pt);
        openssl_error("EVP_CTRL_AEAD_SET_TAG");
        return -1;
    }
    if (EVP_DecryptFinal_ex(ctx, scratch, &outl) <= 0) {  /* the tag did not verify */
        Py_DECREF(pt);
        ERR_clear_error();
        return 0;
    }
    *plain = pt;
    return 0;
}

/* Seal one packet under `counter` into a new datagram (NULL with an exception). */
static PyObject *
seal_one(AeadObject *self, const unsigned char *header, uint64_t counter, const unsigned char *pt,
         Py_ssize_t pt_len)
{
    EVP_CIPHER_CTX *ctx = self->enc;
    unsigned char nonce[NONCE], scratch[TAG], *out, *ct, *tag;
    Py_ssize_t padded;
    int outl;
    PyObject *datagram;

    if (pt_len == 0) {
        pt = (const unsigned char *)PyBytes_AS_STRING(self->empty);
        pt_len = PyBytes_GET_SIZE(self->empty);
    }
    if (pt_len > INT_MAX - MAX_HEADER - MAX_PAD - TAG) {
        PyErr_SetString(PyExc_ValueError, "packet too long");
        return NULL;
    }
    padded = pt_len + (self->pad - pt_len % self->pad) % self->pad;
    if ((datagram = PyBytes_FromStringAndSize(NULL, self->header + padded + TAG)) == NULL)
        return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(datagram);
    memcpy(out, header, (size_t)self->header);
    write_counter(self, out + self->counter_at, counter);
    make_nonce(self, out + self->counter_at, nonce);
    if (self->tag_first) {
        tag = out + self->header;
        ct = tag + TAG;
    } else {
        ct = out + self->header;
        tag = ct + padded;
    }
    if (!EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce)) {
        openssl_error("EVP_EncryptInit_ex (nonce)");
        goto fail;
    }
    if (self->aad_to > self->aad_from
        && !EVP_EncryptUpdate(ctx, NULL, &outl, out + self->aad_from, (int)(self->aad_to - self->aad_from))) {
        openssl_error("EVP_EncryptUpdate (AAD)");
        goto fail;
    }
    if (pt_len > 0 && (!EVP_EncryptUpdate(ctx, ct, &outl, pt, (int)pt_len) || outl != pt_len)) {
        openssl_error("EVP_EncryptUpdate");
        goto fail;
    }
    if (padded > pt_len
        && (!EVP_EncryptUpdate(ctx, ct + pt_len, &outl, ZEROS, (int)(padded - pt_len))
            || outl != padded - pt_len)) {
        openssl_error("EVP_EncryptUpdate (padding)");
        goto fail;
    }
    if (!EVP_EncryptFinal_ex(ctx, scratch, &outl) || outl != 0) {
        openssl_error("EVP_EncryptFinal_ex");
        goto fail;
    }
    if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG, tag)) {
        openssl_error("EVP_CTRL_AEAD_GET_TAG");
        goto fail;
    }
    return datagram;
fail:
    Py_DECREF(datagram);
    return NULL;
}

PyDoc_STRVAR(open_doc,
"open(datagrams) -> (plaintexts, counters)\n\n"
"Per datagram its plaintext, or None if shorter than header + 16 or the tag fails,\n"
"and its counter (parsed also for failures; 0 for short ones).");

static PyObject *
Aead_open(AeadObject *self, PyObject *datagrams)
{
    PyObject *items, *plain = NULL, *counters = NULL;
    Py_ssize_t n;

    /* a private tuple: the caller's list cannot change under us */
    if ((items = PySequence_Tuple(datagrams)) == NULL)
        return NULL;
    n = PyTuple_GET_SIZE(items);
    if ((plain = PyList_New(n)) == NULL || (counters = PyList_New(n)) == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer view;
        PyObject *pt, *c;
        uint64_t counter;
        int rc;

        if (PyObject_GetBuffer(PyTuple_GET_ITEM(items, i), &view, PyBUF_SIMPLE) < 0)
            goto fail;
        rc = open_one(self, view.buf, view.len, &pt, &counter);
        PyBuffer_Release(&view);
        if (rc < 0)
            goto fail;
        if ((c = PyLong_FromUnsignedLongLong(counter)) == NULL) {
            Py_XDECREF(pt);
            goto fail;
        }
        PyList_SET_ITEM(plain, i, pt != NULL ? pt : Py_NewRef(Py_None));
        PyList_SET_ITEM(counters, i, c);
    }
    Py_DECREF(items);
    return Py_BuildValue("(NN)", plain, counters);
fail:
    Py_DECREF(items);
    Py_XDECREF(plain);
    Py_XDECREF(counters);
    return NULL;
}

PyDoc_STRVAR(seal_doc,
"seal(header, counter0, packets) -> datagrams\n\n"
"Datagram i: the header template with counter0 + i written at counter_at, then\n"
"tag and ciphertext (or ciphertext and tag) of packet i (layout.empty if empty)\n"
"padded with zeros to layout.pad.");

static PyObject *
Aead_seal(AeadObject *self, PyObject *args)
{
    Py_buffer header = {0};
    PyObject *counter_obj, *packets, *items = NULL, *out = NULL;
    unsigned long long counter0, max;
    Py_ssize_t n;

    if (!PyArg_ParseTuple(args, "y*O!O:seal", &header, &PyLong_Type, &counter_obj, &packets))
        return NULL;
    if (header.len != self->header) {
        PyErr_Format(PyExc_ValueError, "the header template must be %zd bytes, not %zd", self->header,
                     header.len);
        goto done;
    }
    counter0 = PyLong_AsUnsignedLongLong(counter_obj);
    if (counter0 == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "counter0 is out of the counter's range");
        goto done;
    }
    if ((items = PySequence_Tuple(packets)) == NULL)
        goto done;
    n = PyTuple_GET_SIZE(items);
    max = self->counter_len == 8 ? UINT64_MAX : UINT32_MAX;
    if (counter0 > max || (n > 0 && (unsigned long long)(n - 1) > max - counter0)) {
        PyErr_SetString(PyExc_ValueError, "counter0 is out of the counter's range");
        goto done;
    }
    if ((out = PyList_New(n)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer view;
        PyObject *datagram;

        if (PyObject_GetBuffer(PyTuple_GET_ITEM(items, i), &view, PyBUF_SIMPLE) < 0) {
            Py_CLEAR(out);
            goto done;
        }
        datagram = seal_one(self, header.buf, counter0 + (unsigned long long)i, view.buf, view.len);
        PyBuffer_Release(&view);
        if (datagram == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, datagram);
    }
done:
    PyBuffer_Release(&header);
    Py_XDECREF(items);
    return out;
}

static PyObject *
Aead_get_cipher(AeadObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->cipher);
}

static PyObject *
Aead_get_layout(AeadObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->layout);
}

static PyMethodDef Aead_methods[] = {
    {"open", (PyCFunction)Aead_open, METH_O, open_doc},
    {"seal", (PyCFunction)Aead_seal, METH_VARARGS, seal_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Aead_getset[] = {
    {"cipher", (getter)Aead_get_cipher, NULL, "the cipher's name", NULL},
    {"layout", (getter)Aead_get_layout, NULL, "the protocol's Layout", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Aead_doc,
"BatchAead(cipher, key, layout, prefix, suffix)\n\n"
"The AEAD of batches of datagrams laid out as `layout` says (fabric.dataplane.aead).");

static PyTypeObject AeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fabric.dataplane._native.BatchAead",
    .tp_basicsize = sizeof(AeadObject),
    .tp_dealloc = (destructor)Aead_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Aead_doc,
    .tp_methods = Aead_methods,
    .tp_getset = Aead_getset,
    .tp_new = Aead_new,
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fabric.dataplane._native",
    .m_doc = "Batch AEAD through OpenSSL's EVP API (see fabric/dataplane/aead.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *m;

    if (PyType_Ready(&AeadType) < 0)
        return NULL;
    if ((m = PyModule_Create(&native_module)) == NULL)
        return NULL;
    Py_INCREF(&AeadType);
    if (PyModule_AddObject(m, "BatchAead", (PyObject *)&AeadType) < 0) {
        Py_DECREF(&AeadType);
        Py_DECREF(m);
        return NULL;
    }
    /* the library loaded at run time, e.g. "OpenSSL 3.0.19 27 Jan 2026" */
    if (PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
