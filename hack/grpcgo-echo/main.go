// What grpc-go's server costs per ModelInfer call (a diagnostic, not a server): it takes any unary call,
// finds raw_input_contents (field 7) with protowire, copies it into a 1 MiB slot of a 64 MiB arena (as a
// protocol worker copies a request's tensors into its shared-memory slot), answers 16 bytes, and prints the
// process's CPU per call over -d, from 1.5 s after it starts (the load's warm-up). Before writing a gRPC
// protocol worker in Go, compare it with a Python worker's CPU per request (hack/serve-profile.py):
//
//	cd hack/grpcgo-echo && go build -o /tmp/grpcgo-echo . && /tmp/grpcgo-echo -d 6s   # prints its address
//	.cache/gobin/grpcload -addr ADDR -request REQ -c 16 -connections 4 -d 7s -warmup 1s
//
// REQ: a serialized ModelInferRequest, e.g. bench/serve_bench.py's bodies("tinyimage")[3] (602 KB).
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
)

type raw struct{}

func (raw) Marshal(v any) ([]byte, error)   { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(d []byte, v any) error { *(v.(*[]byte)) = d; return nil }
func (raw) Name() string                    { return "proto" }

var arena = make([]byte, 64<<20)
var next, calls int64

func cpu() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "")
	d := flag.Duration("d", 8*time.Second, "")
	flag.Parse()
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		panic(err)
	}
	fmt.Println(lis.Addr().String())
	resp := make([]byte, 16)
	srv := grpc.NewServer(grpc.ForceServerCodec(raw{}), grpc.MaxRecvMsgSize(1<<30),
		grpc.UnknownServiceHandler(func(_ any, st grpc.ServerStream) error {
			var req []byte
			if err := st.RecvMsg(&req); err != nil {
				return err
			}
			b := req
			for len(b) > 0 {
				num, typ, n := protowire.ConsumeTag(b)
				if n < 0 {
					break
				}
				b = b[n:]
				if num == 7 && typ == protowire.BytesType {
					v, m := protowire.ConsumeBytes(b)
					slot := atomic.AddInt64(&next, 1) % 64
					copy(arena[slot<<20:], v)
					b = b[m:]
					continue
				}
				m := protowire.ConsumeFieldValue(num, typ, b)
				if m < 0 {
					break
				}
				b = b[m:]
			}
			atomic.AddInt64(&calls, 1)
			r := resp
			return st.SendMsg(&r)
		}))
	go srv.Serve(lis)
	time.Sleep(1500 * time.Millisecond) // the client's warm-up
	c0, n0, t0 := cpu(), atomic.LoadInt64(&calls), time.Now()
	time.Sleep(*d)
	c1, n1 := cpu(), atomic.LoadInt64(&calls)
	n := n1 - n0
	fmt.Fprintf(os.Stderr, "calls %d in %.1f s, server CPU %.1f us per call\n", n, time.Since(t0).Seconds(),
		float64((c1-c0).Microseconds())/float64(n))
	srv.Stop()
}
