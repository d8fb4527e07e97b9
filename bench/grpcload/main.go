// grpcload: closed-loop load for one unary gRPC method, with a request message serialized once and sent
// as it is (a pass-through codec: no per-call marshalling). bench/serve_bench.py uses it for the gRPC rows:
// ghz re-reads its call data through Go templates and a dynamic message for every call, which cost 626 µs of
// CPU per 602 KB request on the machine being measured (docs/benchmarks.md).
//
//	grpcload -addr 127.0.0.1:8001 -request req.bin -c 64 -connections 16 -d 5s
//	grpcload ... -stream /inference.GRPCInferenceService/ModelStreamInfer   # requests on one stream per caller
//	grpcload ... -h2 xnet   # unary calls over golang.org/x/net/http2, in DATA frames as large as the server allows
//
// grpc-go writes a message in 16 KiB DATA frames whatever the server's SETTINGS_MAX_FRAME_SIZE (37 frames for
// a 602 KB image); grpcio's C core, which tritonclient and Triton's perf_analyzer use, sends frames as large
// as the server allows (3-4 for the same image with grpcio 1.85: hack/grpc-frames.py). -h2 xnet sends them as
// x/net's HTTP/2 client does, up to the server's limit or 512 KiB (2 for that image; 16 KiB frames only for a
// connection's first call, sent before the server's SETTINGS are read, which the warm-up takes): the same
// calls (headers, the 5-byte message prefix, grpc-status in the trailers), framed as the C core frames them.
//
// prints one JSON object: calls completed in the window, rps, latency percentiles (ms), errors by code.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// raw sends the bytes it is given and keeps the length of what comes back: the server's answer is read
// off the wire whole, but not decoded.
type raw struct{}

func (raw) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(data []byte, v any) error {
	switch r := v.(type) {
	case *int:
		*r = len(data)
	case *streamed:
		// Triton's ModelStreamInferResponse: field 1 (error_message, tag 0x0a) first when a request failed
		r.n, r.failed = len(data), len(data) > 0 && data[0] == 0x0a
	}
	return nil
}

// streamed is what -stream keeps of an answer: its length, and whether it carries an error message.
type streamed struct {
	n      int
	failed bool
}

func (raw) Name() string { return "proto" } // the content-type stays application/grpc+proto

type result struct {
	Calls     int            `json:"calls"`
	Seconds   float64        `json:"seconds"`
	RPS       float64        `json:"rps"`
	P50       float64        `json:"p50_ms"`
	P90       float64        `json:"p90_ms"`
	P99       float64        `json:"p99_ms"`
	Errors    map[string]int `json:"errors"`
	FirstErr  string         `json:"first_error,omitempty"`
	ReplySize int            `json:"reply_bytes"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8001", "server host:port")
	method := flag.String("method", "/inference.GRPCInferenceService/ModelInfer", "full method name")
	reqPath := flag.String("request", "", "file holding the serialized request message")
	c := flag.Int("c", 1, "concurrent callers (each waits for its answer before the next call)")
	conns := flag.Int("connections", 1, "HTTP/2 connections the callers share, round robin")
	d := flag.Duration("d", 5*time.Second, "how long to measure")
	warm := flag.Duration("warmup", 500*time.Millisecond, "calls before the window, not counted")
	timeout := flag.Duration("timeout", 20*time.Second, "deadline of each call")
	wbuf := flag.Int("write-buffer", 32<<10, "bytes grpc-go gathers before a write to the socket (its default: 32 KiB)")
	stream := flag.String("stream", "", "a bidirectional streaming method (Triton's "+
		"/inference.GRPCInferenceService/ModelStreamInfer): each caller sends its requests on one call of it, "+
		"one at a time, instead of a unary call each")
	window := flag.Int("window", 0, "static HTTP/2 receive windows, stream and connection, in bytes (0: grpc-go's default, "+
		"64 KiB grown by its bandwidth estimate, which pings the server as answers arrive)")
	h2 := flag.String("h2", "grpc-go", "the HTTP/2 client: grpc-go (16 KiB DATA frames), or xnet "+
		"(golang.org/x/net/http2: frames as large as the server allows, up to 512 KiB; unary calls only)")
	flag.Parse()
	req, err := os.ReadFile(*reqPath)
	if err != nil || *c < 1 || *conns < 1 || (*h2 != "grpc-go" && *h2 != "xnet") || (*h2 == "xnet" && *stream != "") {
		fmt.Fprintln(os.Stderr, "grpcload: -request FILE (a serialized message), -c >= 1, -connections >= 1, "+
			"-h2 grpc-go or xnet (xnet: no -stream):", err)
		os.Exit(2)
	}
	var xnet []*xnetConn
	if *h2 == "xnet" {
		for i := 0; i < min(*conns, *c); i++ {
			xnet = append(xnet, newXnetConn(*addr, *method, req))
		}
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(raw{}),
			grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30)),
		grpc.WithWriteBufferSize(*wbuf),
	}
	if *window > 0 {
		opts = append(opts, grpc.WithInitialWindowSize(int32(*window)), grpc.WithInitialConnWindowSize(int32(*window)))
	}
	cc := make([]*grpc.ClientConn, min(*conns, *c))
	for i := range cc {
		cc[i], err = grpc.NewClient(*addr, opts...)
		if err != nil {
			fmt.Fprintln(os.Stderr, "grpcload:", err)
			os.Exit(1)
		}
		defer cc[i].Close()
	}
	start := time.Now().Add(*warm)
	end := start.Add(*d)
	lat := make([][]time.Duration, *c)
	errs := make([]map[string]int, *c)
	firstErr := make([]string, *c)
	reply := 0
	var once sync.Once
	var wg sync.WaitGroup
	for w := 0; w < *c; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			conn, e := cc[w%len(cc)], map[string]int{}
			errs[w] = e
			var call grpc.ClientStream
			if *stream != "" {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				desc := &grpc.StreamDesc{StreamName: "stream", ServerStreams: true, ClientStreams: true}
				var err error
				if call, err = conn.NewStream(ctx, desc, *stream); err != nil {
					e[status.Code(err).String()]++
					firstErr[w] = err.Error()
					return
				}
				defer call.CloseSend() //nolint:errcheck
			}
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					return
				}
				var n int
				var err error
				inBand := false
				if call != nil {
					var got streamed
					if err = call.SendMsg(&req); err == nil {
						err = call.RecvMsg(&got)
					}
					if err == nil && got.failed {
						err, inBand = fmt.Errorf("an error in the answer (%d bytes)", got.n), true
					}
					n = got.n
				} else {
					ctx, cancel := context.WithTimeout(context.Background(), *timeout)
					if xnet != nil {
						n, err = xnet[w%len(xnet)].invoke(ctx)
					} else {
						err = conn.Invoke(ctx, *method, &req, &n)
					}
					cancel()
				}
				t1 := time.Now()
				if t0.Before(start) || t1.After(end) {
					continue // warm-up, or finished after the window closed
				}
				if err != nil {
					code := status.Code(err).String()
					if inBand {
						code = "IN_BAND"
					}
					e[code]++
					if firstErr[w] == "" {
						firstErr[w] = err.Error()
					}
					if call != nil && !inBand {
						return // the stream is broken: this caller is done
					}
					continue
				}
				once.Do(func() { reply = n })
				lat[w] = append(lat[w], t1.Sub(t0))
			}
		}(w)
	}
	wg.Wait()
	var all []time.Duration
	r := result{Errors: map[string]int{}, Seconds: d.Seconds(), ReplySize: reply}
	for w := range lat {
		all = append(all, lat[w]...)
		for k, v := range errs[w] {
			r.Errors[k] += v
		}
		if r.FirstErr == "" {
			r.FirstErr = firstErr[w]
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return -1
		}
		return float64(all[min(len(all)-1, int(p*float64(len(all))))]) / 1e6
	}
	r.Calls, r.RPS = len(all), float64(len(all))/d.Seconds()
	r.P50, r.P90, r.P99 = pct(0.50), pct(0.90), pct(0.99)
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}

// xnetConn makes unary gRPC calls over one HTTP/2 connection of golang.org/x/net/http2's client (its own
// Transport: one connection, every caller's calls multiplexed on it, as grpc-go's ClientConn does).
type xnetConn struct {
	client *http.Client
	url    string
	body   []byte // the message with gRPC's 5-byte prefix (uncompressed, length)
}

func newXnetConn(addr, method string, req []byte) *xnetConn {
	body := make([]byte, 5+len(req))
	binary.BigEndian.PutUint32(body[1:5], uint32(len(req)))
	copy(body[5:], req)
	t := &http2.Transport{
		AllowHTTP:          true, // h2c: HTTP/2 over plain TCP, with prior knowledge (as gRPC's insecure channels)
		DisableCompression: true, // no accept-encoding: gzip, which no gRPC client sends
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	return &xnetConn{client: &http.Client{Transport: t}, url: "http://" + addr + method, body: body}
}

// invoke makes one call: the answer's message length, or the call's error (its gRPC status where the server
// sent one).
func (x *xnetConn) invoke(ctx context.Context) (int, error) {
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, x.url, bytes.NewReader(x.body))
	if err != nil {
		return 0, err
	}
	r.Header.Set("Content-Type", "application/grpc")
	r.Header.Set("TE", "trailers")
	resp, err := x.client.Do(r)
	if err != nil {
		return 0, status.FromContextError(err).Err()
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, status.FromContextError(err).Err()
	}
	code := resp.Trailer.Get("Grpc-Status")
	if code == "" { // a trailers-only answer: the status in the headers
		code = resp.Header.Get("Grpc-Status")
	}
	if n, e := strconv.Atoi(code); e != nil || n != 0 {
		msg := resp.Trailer.Get("Grpc-Message") + resp.Header.Get("Grpc-Message")
		if e != nil {
			return 0, status.Errorf(codes.Unknown, "HTTP %d without a grpc-status", resp.StatusCode)
		}
		return 0, status.Error(codes.Code(n), msg)
	}
	if len(got) < 5 {
		return 0, status.Errorf(codes.Internal, "an answer of %d bytes: no message", len(got))
	}
	return int(binary.BigEndian.Uint32(got[1:5])), nil
}
