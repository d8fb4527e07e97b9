/* The gRPC server's receive loop for the middle of unary calls' messages, in C (optional: http2.py does the
 * same in Python when this module is not built; docs/serving.md, "The receive loop in C").
 *
 * `data_run(streams, view, off, end, conn_unacked, limit)` takes the whole DATA frames at view[off:end], one
 * after the other, while each is the middle of a unary call's message: no PADDED or END_STREAM flag, its
 * stream in `streams` with a message buffer (`body.view`) that has room for the payload, no task yet, no
 * inbox (not a streaming call), not `counted` (no content-length to check), and neither the connection's nor
 * the stream's unacknowledged bytes reaching `limit` (a WINDOW_UPDATE is due: Python sends it). Each
 * payload is copied to its message, and the stream's `filled` and `unacked` grow by it. The first frame it
 * does not take stops it; it returns (offset reached, the connection's unacknowledged bytes). Nothing here
 * calls back into Python code: `streams` and the streams' objects cannot change while it runs.
 *
 * Built against the limited API of 3.11, so one build loads in every CPython from 3.11 on. */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DATA 0x0
#define END_STREAM 0x1
#define PADDED 0x8
#define MAX_FRAME (1 << 20)
#define CACHED 16 /* streams one run keeps at hand (grpc-go interleaves a connection's calls frame by frame) */

static PyObject *s_body, *s_view, *s_task, *s_inbox, *s_counted, *s_filled, *s_unacked;

typedef struct {
    uint32_t sid;
    PyObject *stream; /* borrowed: `streams` holds it, and no Python code runs until the run ends */
    Py_buffer buf;
    Py_ssize_t filled, unacked;
    int dirty;
} Entry;

/* The stream's entry, or NULL when its frame is not ours to take (-1 in *err: an exception is set). */
static Entry *entry(PyObject *streams, uint32_t sid, Entry *cache, int *used, int *err) {
    for (int i = 0; i < *used; i++)
        if (cache[i].sid == sid)
            return cache[i].stream ? &cache[i] : NULL;
    if (*used == CACHED)
        return NULL;
    Entry *e = &cache[*used];
    memset(e, 0, sizeof *e);
    e->sid = sid;
    PyObject *key = PyLong_FromUnsignedLong(sid);
    if (key == NULL)
        goto fail;
    PyObject *s = PyDict_GetItemWithError(streams, key); /* borrowed */
    Py_DECREF(key);
    if (s == NULL) {
        if (PyErr_Occurred())
            goto fail;
        (*used)++; /* remembered as not ours */
        return NULL;
    }
    PyObject *body = NULL, *view = NULL, *v = NULL;
    int ok = 0;
    if ((v = PyObject_GetAttr(s, s_task)) == NULL)
        goto fail;
    ok = v == Py_None;
    Py_DECREF(v);
    if (ok) {
        if ((v = PyObject_GetAttr(s, s_inbox)) == NULL)
            goto fail;
        ok = v == Py_None;
        Py_DECREF(v);
    }
    if (ok) {
        if ((v = PyObject_GetAttr(s, s_counted)) == NULL)
            goto fail;
        ok = v == Py_False;
        Py_DECREF(v);
    }
    if (ok) {
        if ((body = PyObject_GetAttr(s, s_body)) == NULL)
            goto fail;
        ok = body != Py_None;
    }
    if (ok) {
        view = PyObject_GetAttr(body, s_view);
        Py_DECREF(body);
        if (view == NULL)
            goto fail;
        ok = PyObject_GetBuffer(view, &e->buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == 0;
        Py_DECREF(view);
        if (!ok)
            PyErr_Clear(); /* not a writable buffer: Python's path takes its frames */
    } else {
        Py_XDECREF(body);
    }
    if (ok) {
        if ((v = PyObject_GetAttr(s, s_filled)) == NULL)
            goto fail_buf;
        e->filled = PyLong_AsSsize_t(v);
        Py_DECREF(v);
        if ((v = PyObject_GetAttr(s, s_unacked)) == NULL)
            goto fail_buf;
        e->unacked = PyLong_AsSsize_t(v);
        Py_DECREF(v);
        if (PyErr_Occurred())
            goto fail_buf;
        e->stream = s;
    }
    (*used)++;
    return e->stream ? e : NULL;
fail_buf:
    PyBuffer_Release(&e->buf);
fail:
    *err = -1;
    return NULL;
}

static int set_ssize(PyObject *o, PyObject *name, Py_ssize_t value) {
    PyObject *v = PyLong_FromSsize_t(value);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(o, name, v);
    Py_DECREF(v);
    return rc;
}

static PyObject *data_run(PyObject *self, PyObject *args) {
    PyObject *streams, *view;
    Py_ssize_t off, end, conn_unacked, limit;
    if (!PyArg_ParseTuple(args, "O!Onnnn", &PyDict_Type, &streams, &view, &off, &end, &conn_unacked, &limit))
        return NULL;
    Py_buffer in;
    if (PyObject_GetBuffer(view, &in, PyBUF_C_CONTIGUOUS) != 0)
        return NULL;
    if (off < 0 || end > in.len || off > end) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "data_run: off and end must lie within the view");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)in.buf;
    Entry cache[CACHED];
    int used = 0, err = 0;
    while (end - off >= 9) {
        const unsigned char *h = p + off;
        Py_ssize_t length = (Py_ssize_t)h[0] << 16 | h[1] << 8 | h[2];
        uint32_t sid = ((uint32_t)h[5] << 24 | (uint32_t)h[6] << 16 | (uint32_t)h[7] << 8 | h[8]) & 0x7FFFFFFF;
        if (h[3] != DATA || h[4] & (PADDED | END_STREAM) || length > MAX_FRAME || end - off - 9 < length)
            break;
        Entry *e = entry(streams, sid, cache, &used, &err);
        if (e == NULL)
            break;
        if (e->filled + length > e->buf.len || conn_unacked + length >= limit || e->unacked + length >= limit)
            break;
        memcpy((char *)e->buf.buf + e->filled, h + 9, (size_t)length);
        e->filled += length;
        e->unacked += length;
        e->dirty = 1;
        conn_unacked += length;
        off += 9 + length;
    }
    for (int i = 0; i < used; i++) {
        Entry *e = &cache[i];
        if (e->stream == NULL)
            continue;
        if (e->dirty && !err &&
            (set_ssize(e->stream, s_filled, e->filled) < 0 || set_ssize(e->stream, s_unacked, e->unacked) < 0))
            err = -1;
        PyBuffer_Release(&e->buf);
    }
    PyBuffer_Release(&in);
    if (err)
        return NULL;
    return Py_BuildValue("nn", off, conn_unacked);
}

static PyMethodDef methods[] = {
    {"data_run", data_run, METH_VARARGS,
     "data_run(streams, view, off, end, conn_unacked, limit) -> (off, conn_unacked): take the run of whole "
     "DATA frames at view[off:end] that are the middle of unary calls' messages"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_h2fast", NULL, -1, methods};

PyMODINIT_FUNC PyInit__h2fast(void) {
    const char *names[] = {"body", "view", "task", "inbox", "counted", "filled", "unacked"};
    PyObject **slots[] = {&s_body, &s_view, &s_task, &s_inbox, &s_counted, &s_filled, &s_unacked};
    for (int i = 0; i < 7; i++)
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    return PyModule_Create(&module);
}
