// Command relay is the Go comparator of fastnat's relay benchmarks
// (bench/report_relay.py): frp's architecture on hashicorp/yamux, reduced to
// its data path.
//
//	client ──TCP──▶ relay ══ one yamux stream per client ══▶ server (dialled out to the relay)
//
// It is written against the hashicorp/yamux that Debian packages
// (golang-github-hashicorp-yamux-dev) and builds in GOPATH mode without
// network access (bench/procs.py does this):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=/some/writable/dir \
//	    go build -o relay relay.go
//
// # Modes
//
//	relay -mode relay [-server-listen 127.0.0.1:0] [-client-listen 127.0.0.1:0]
//
// Listens on two ports. A server dials the first; its TCP connection becomes a
// yamux session on which the relay is the accepting side (yamux.Server: even
// stream ids, as fastnat's forwarder). Each TCP connection on the second port
// (a client) gets its own stream, opened by the relay on the newest server
// session, and is spliced to it both ways with io.Copy: a client's FIN becomes
// the stream's Close (FIN), the stream's end becomes CloseWrite on the client
// connection, and both are closed when both directions are done. There is no
// handshake: a client's bytes follow the stream's SYN at once.
//
//	relay -mode server -relay 127.0.0.1:PORT
//
// Dials the relay's server port, runs yamux.Client on it (odd ids) and serves
// every stream the relay opens with the benchmark workload protocol (the same
// as bench/net_peer.py's servers): the first byte of a stream picks the
// workload:
//
//	'E'            echo: write the 'E' back, then copy everything read back until EOF.
//	'U' + u64 N    upload: read N bytes, then write N back as a big-endian u64; read to EOF.
//	'u' + u64 N    the same, checking the bytes against the pattern below (answer 2^64-1 if wrong).
//	'D' + u64 N    download: write N bytes (the pattern byte(i*7+1), i mod 256 KiB,
//	               repeated), then Close (FIN); read to EOF.
//
// Both modes use yamux.DefaultConfig() (256 KiB stream windows, keepalive
// every 30 s), log yamux to stderr, print one JSON line on stdout when ready
// ({"event":"listening",...} for the relay, {"event":"ready"} for the server),
// exit when stdin reaches EOF (so an orphan dies with its parent's pipe), and
// exit anyway after -lifetime. Only 127.0.0.1 addresses are accepted.
//
// # Reading after Close
//
// In this yamux version Stream.Read returns io.EOF as soon as the receive
// buffer is empty once the stream was closed locally, even before the peer's
// FIN. The benchmark workloads never half-close a direction while the other
// still carries data it needs (a client closes only after its exchange is
// over), so the relay splices with plain io.Copy.
package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

const ioBuffer = 256 * 1024 // the server's reads and writes (not the relay's: io.Copy's own 32 KiB)

// pattern2 is the workload pattern twice over, so that any read of at most
// ioBuffer bytes starting anywhere in the pattern is one slice of it.
var pattern2 = func() []byte {
	p := make([]byte, 2*ioBuffer)
	for i := range p {
		p[i] = byte((i%ioBuffer)*7 + 1)
	}
	return p
}()

var outMu sync.Mutex

func emit(m map[string]interface{}) {
	line, _ := json.Marshal(m)
	outMu.Lock()
	os.Stdout.Write(append(line, '\n'))
	outMu.Unlock()
}

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "relay: "+format+"\n", args...)
	os.Exit(2)
}

func checkLoopback(addr string) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil || host != "127.0.0.1" {
		fatal("only 127.0.0.1 addresses are accepted, got %q", addr)
	}
}

func main() {
	mode := flag.String("mode", "", "relay | server")
	serverListen := flag.String("server-listen", "127.0.0.1:0", "relay: address servers dial")
	clientListen := flag.String("client-listen", "127.0.0.1:0", "relay: address clients dial")
	relayAddr := flag.String("relay", "", "server: the relay's server address")
	lifetime := flag.Duration("lifetime", 60*time.Minute, "exit after this long whatever happens")
	flag.Parse()

	go func() { // EOF on stdin: the driver is gone
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	time.AfterFunc(*lifetime, func() {
		fmt.Fprintf(os.Stderr, "relay: lifetime %s over, exiting\n", *lifetime)
		os.Exit(3)
	})

	switch *mode {
	case "relay":
		checkLoopback(*serverListen)
		checkLoopback(*clientListen)
		runRelay(*serverListen, *clientListen)
	case "server":
		checkLoopback(*relayAddr)
		runServer(*relayAddr)
	default:
		fatal("-mode relay or -mode server")
	}
}

// ----------------------------------------------------------------- relay

type relay struct {
	mu      sync.Mutex
	session *yamux.Session
}

func (r *relay) current() *yamux.Session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.session
}

func runRelay(serverAddr, clientAddr string) {
	ls, err := net.Listen("tcp", serverAddr)
	if err != nil {
		fatal("listen %s: %v", serverAddr, err)
	}
	lc, err := net.Listen("tcp", clientAddr)
	if err != nil {
		fatal("listen %s: %v", clientAddr, err)
	}
	r := &relay{}
	emit(map[string]interface{}{"event": "listening", "server_addr": ls.Addr().String(), "client_addr": lc.Addr().String()})
	go func() {
		for {
			conn, err := ls.Accept()
			if err != nil {
				fatal("accept (servers): %v", err)
			}
			session, err := yamux.Server(conn, yamux.DefaultConfig())
			if err != nil {
				fatal("yamux.Server: %v", err)
			}
			r.mu.Lock()
			r.session = session
			r.mu.Unlock()
			emit(map[string]interface{}{"event": "server-connected", "peer": conn.RemoteAddr().String()})
		}
	}()
	for {
		conn, err := lc.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Temporary() {
				time.Sleep(time.Millisecond)
				continue
			}
			fatal("accept (clients): %v", err)
		}
		go r.serveClient(conn.(*net.TCPConn))
	}
}

func (r *relay) serveClient(client *net.TCPConn) {
	session := r.current()
	if session == nil {
		client.Close()
		return
	}
	stream, err := session.OpenStream()
	if err != nil {
		fmt.Fprintf(os.Stderr, "relay: OpenStream: %v\n", err)
		client.Close()
		return
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // client -> server
		defer wg.Done()
		if _, err := io.Copy(stream, client); err != nil {
			client.Close()
		}
		stream.Close() // FIN
	}()
	go func() { // server -> client
		defer wg.Done()
		if _, err := io.Copy(client, stream); err != nil {
			client.SetLinger(0)
			client.Close()
			return
		}
		client.CloseWrite()
	}()
	wg.Wait()
	client.Close()
	stream.Close()
}

// ----------------------------------------------------------------- server

func runServer(relayAddr string) {
	conn, err := net.Dial("tcp", relayAddr)
	if err != nil {
		fatal("dial %s: %v", relayAddr, err)
	}
	session, err := yamux.Client(conn, yamux.DefaultConfig())
	if err != nil {
		fatal("yamux.Client: %v", err)
	}
	emit(map[string]interface{}{"event": "ready", "local_addr": conn.LocalAddr().String()})
	for {
		stream, err := session.AcceptStream()
		if err != nil {
			if session.IsClosed() {
				emit(map[string]interface{}{"event": "session-closed"})
				os.Exit(1)
			}
			fatal("AcceptStream: %v", err)
		}
		go serveStream(stream)
	}
}

func serveStream(s *yamux.Stream) {
	defer s.Close()
	if err := workload(s); err != nil && !errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "closed") {
		fmt.Fprintf(os.Stderr, "relay server: stream %d: %v\n", s.StreamID(), err)
	}
}

func drain(s io.Reader, buf []byte) {
	for {
		if _, err := s.Read(buf); err != nil {
			return
		}
	}
}

func workload(s *yamux.Stream) error {
	var op [1]byte
	if _, err := io.ReadFull(s, op[:]); err != nil {
		return err
	}
	switch op[0] {
	case 'E':
		if _, err := s.Write(op[:]); err != nil {
			return err
		}
		_, err := io.Copy(s, s)
		return err
	case 'U', 'u', 'D':
		var arg [8]byte
		if _, err := io.ReadFull(s, arg[:]); err != nil {
			return err
		}
		n := binary.BigEndian.Uint64(arg[:])
		buf := make([]byte, ioBuffer)
		if op[0] != 'D' {
			var got uint64
			good := true
			for got < n {
				k, err := s.Read(buf)
				if op[0] == 'u' && good && k > 0 {
					start := got % ioBuffer
					good = bytes.Equal(buf[:k], pattern2[start:start+uint64(k)])
				}
				got += uint64(k)
				if err != nil {
					return fmt.Errorf("upload: %d of %d bytes: %w", got, n, err)
				}
			}
			if !good {
				got = ^uint64(0)
			}
			binary.BigEndian.PutUint64(arg[:], got)
			if _, err := s.Write(arg[:]); err != nil {
				return err
			}
			drain(s, buf)
			return nil
		}
		copy(buf, pattern2)
		for left := n; left > 0; {
			k := uint64(len(buf))
			if left < k {
				k = left
			}
			if _, err := s.Write(buf[:k]); err != nil {
				return fmt.Errorf("download: %d left: %w", left, err)
			}
			left -= k
		}
		s.Close() // FIN; the client closes after the last byte
		drain(s, buf)
		return nil
	default:
		return fmt.Errorf("unknown workload %q", op[0])
	}
}
