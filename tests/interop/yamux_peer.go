// Command yamux_peer is a hashicorp/yamux peer that fastnat's interop tests
// drive over one TCP connection on the loopback interface.
//
// It is written against the hashicorp/yamux that Debian packages
// (golang-github-hashicorp-yamux-dev, 2019) and builds in GOPATH mode without
// network access:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=/some/writable/dir \
//	    go build -o yamux_peer yamux_peer.go
//
// # Command line
//
//	yamux_peer -mode server [-addr 127.0.0.1:0]   listen, accept ONE TCP connection, run a yamux server (even ids)
//	yamux_peer -mode client -addr 127.0.0.1:PORT  dial, run a yamux client (odd ids)
//
//	-window BYTES        Config.MaxStreamWindowSize (default 262144). Above 256 KiB
//	                     yamux advertises the larger window on its SYN and ACK.
//	-backlog N           Config.AcceptBacklog (default 256). yamux refuses (RST)
//	                     inbound streams beyond it that are not accepted yet.
//	-accept-paused       start with the accept loop paused (see "accept").
//	-keepalive DURATION  enable yamux keepalive pings at this interval (default 0: off).
//	-write-timeout DUR   Config.ConnectionWriteTimeout (default 30s); also bounds Ping.
//	-lifetime DURATION   exit by itself after this long, whatever happens (default 10m):
//	                     a last resort against leaked processes.
//
// Only 127.0.0.1 addresses are accepted. yamux's own log goes to stderr.
//
// # Output: stdout, one JSON object per line
//
//	{"event":"listening","addr":"127.0.0.1:PORT"}     server mode, before accepting
//	{"event":"ready","addr":...,"client":bool}         the yamux session runs; commands are read from now on
//	{"event":"reply","tag":T,"ok":bool,"error":E,"kind":K,...}   one per command (extra fields below)
//	{"event":"accepted","id":N}                        the accept loop accepted stream N (yamux sent its ACK)
//	{"event":"stream",...}                             a stream's action finished (see below)
//	{"event":"session-closed"}                         the yamux session is over (why: see the log on stderr)
//
// A "stream" report has: "id", "origin" ("remote": opened by the other side,
// the action named by its first line; "local": opened by the "open" command),
// "tag" (the tag of that "open" command, "" for remote streams), "action"
// (the action line), "read" and "read_sha256" (bytes this side read from the
// stream after the action line, and their SHA-256 in hex), "written" and
// "written_sha256" (bytes it wrote), "error" and "kind" ("" when the action
// succeeded), and for echo-check "match".
//
// Error kinds: "reset" (yamux.ErrConnectionReset: the stream was reset or
// refused), "goaway" (ErrRemoteGoAway), "shutdown" (ErrSessionShutdown),
// "stream-closed", "timeout", "write-timeout", "eof" (unexpected end of
// stream), "protocol" (bad command or action), "other".
//
// # Control: stdin, one command per line: TAG VERB ARGS...
//
// TAG is any word chosen by the driver; the reply carries it. Each command
// runs in its own goroutine, so a slow one (ping) does not hold up the rest:
// wait for a command's reply before sending one that depends on it. EOF on
// stdin ends the process, like "quit" (so a peer whose driver died exits).
//
//	TAG ping                 Session.Ping(); reply has "rtt_ns".
//	TAG goaway               Session.GoAway() (code 0); the reply comes after the frame is written.
//	TAG open K ACTION...     open K streams (sequentially), then run ACTION on each
//	                         concurrently; reply has "ids" (those opened) once all K
//	                         OpenStream calls returned (ok=false with the error if one failed).
//	                         Each stream then produces a "stream" report.
//	TAG accept pause|resume  pause or resume the accept loop. Pausing takes effect before
//	                         the next AcceptStream call (one already waiting may still take
//	                         one stream); use -accept-paused for an exact start.
//	TAG release              open the gate that "wait" actions wait for (it stays open).
//	TAG stats                reply has "streams" (Session.NumStreams) and "closed".
//	TAG close                Session.Close(): closes the TCP connection, no Go Away.
//	TAG quit                 reply, then exit 0.
//
// # Stream actions
//
// A stream opened by the other side starts with one line, at most 1024 bytes,
// naming the action; everything after that line is the stream's data. For
// streams opened here, the action comes from the "open" command. Actions:
//
//	echo                 copy everything read back to the stream; at EOF, Close (FIN).
//	sink                 read to EOF, then write the line "<bytes> <sha256hex>\n", then Close.
//	send N SEED          write N bytes of data(SEED), Close (FIN), then read to EOF.
//	sink-send N SEED     read to EOF, then write N bytes of data(SEED), then Close.
//	echo-check N SEED    write N bytes of data(SEED) and Close, while reading to EOF;
//	                     "match" tells whether what came back equals what was sent.
//	wait ACTION...       wait for the "release" command, then run ACTION. Nothing is
//	                     read meanwhile, so the sender fills this side's window.
//
// data(SEED) is xorshift64* seeded with SEED (0 is replaced by 1), each 64-bit
// output written little-endian; reports carry its SHA-256, so a driver need not
// regenerate it. The K streams of one "open" command get different data: the
// i-th (from 0) runs its action with SEED+i.
//
// # Reading after Close
//
// In this yamux version Stream.Read returns io.EOF as soon as the receive
// buffer is empty once the stream was closed locally, even when the peer has
// not sent its FIN yet (later versions read on until the FIN). The peer works
// around it: it notes the stream's state (an unexported field, read under the
// stream's own lock) before each Read, and takes an io.EOF as the end only if
// the peer's FIN had already arrived by then (remote-closed or closed);
// otherwise it waits a millisecond and reads again. If that field is missing
// (another yamux version), EOF is taken at its word.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/hashicorp/yamux"
)

// ---------------------------------------------------------------- output

var outMu sync.Mutex

func emit(m map[string]interface{}) {
	line, err := json.Marshal(m)
	if err != nil {
		line = []byte(fmt.Sprintf(`{"event":"internal-error","error":%q}`, err.Error()))
	}
	outMu.Lock()
	os.Stdout.Write(append(line, '\n'))
	outMu.Unlock()
}

func errorKind(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, yamux.ErrConnectionReset):
		return "reset"
	case errors.Is(err, yamux.ErrRemoteGoAway):
		return "goaway"
	case errors.Is(err, yamux.ErrSessionShutdown):
		return "shutdown"
	case errors.Is(err, yamux.ErrStreamClosed):
		return "stream-closed"
	case errors.Is(err, yamux.ErrTimeout):
		return "timeout"
	case errors.Is(err, yamux.ErrConnectionWriteTimeout):
		return "write-timeout"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.Is(err, errProtocol):
		return "protocol"
	}
	return "other"
}

var errProtocol = errors.New("protocol")

func protoErr(format string, args ...interface{}) error {
	return fmt.Errorf("%w: %s", errProtocol, fmt.Sprintf(format, args...))
}

// ---------------------------------------------------------------- gates

// gate blocks waiters while closed.
type gate struct {
	mu   sync.Mutex
	ch   chan struct{}
	open bool
}

func newGate(open bool) *gate {
	g := &gate{ch: make(chan struct{})}
	if open {
		close(g.ch)
		g.open = true
	}
	return g
}

func (g *gate) Open() {
	g.mu.Lock()
	if !g.open {
		close(g.ch)
		g.open = true
	}
	g.mu.Unlock()
}

func (g *gate) Close() {
	g.mu.Lock()
	if g.open {
		g.ch = make(chan struct{})
		g.open = false
	}
	g.mu.Unlock()
}

// Wait returns true when the gate is open, false when done closed first.
func (g *gate) Wait(done <-chan struct{}) bool {
	g.mu.Lock()
	ch := g.ch
	g.mu.Unlock()
	select {
	case <-ch:
		return true
	case <-done:
		return false
	}
}

// ---------------------------------------------------------------- data

// gen is xorshift64*: cheap, deterministic test data.
type gen struct{ x uint64 }

func newGen(seed uint64) *gen {
	if seed == 0 {
		seed = 1
	}
	return &gen{x: seed}
}

// fill writes len(b) bytes (len(b) must be a multiple of 8).
func (g *gen) fill(b []byte) {
	x := g.x
	for i := 0; i+8 <= len(b); i += 8 {
		x ^= x >> 12
		x ^= x << 25
		x ^= x >> 27
		binary.LittleEndian.PutUint64(b[i:], x*0x2545F4914F6CDD1D)
	}
	g.x = x
}

const chunk = 64 * 1024

// sendData writes n bytes of data(seed) to w, hashing them into h.
func sendData(w io.Writer, n int64, seed uint64, h hash.Hash) (int64, error) {
	g := newGen(seed)
	buf := make([]byte, chunk)
	var total int64
	for total < n {
		g.fill(buf)
		part := buf
		if left := n - total; left < int64(len(part)) {
			part = part[:left]
		}
		k, err := w.Write(part)
		h.Write(part[:k])
		total += int64(k)
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// ---------------------------------------------------------------- stream state

// The unexported stream states of this yamux version (see "Reading after Close").
const (
	stateRemoteClose = 5
	stateClosed      = 6
)

// streamState returns the stream's state, or -1 when it cannot be read.
func streamState(st *yamux.Stream) int64 {
	v := reflect.ValueOf(st).Elem()
	state := v.FieldByName("state")
	lock := v.FieldByName("stateLock")
	if !state.IsValid() || !lock.IsValid() || lock.Type() != reflect.TypeOf(sync.Mutex{}) {
		return -1
	}
	switch state.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
	default:
		return -1
	}
	mu := (*sync.Mutex)(unsafe.Pointer(lock.UnsafeAddr()))
	mu.Lock()
	s := state.Int()
	mu.Unlock()
	return s
}

// streamReader reads a yamux stream through a bufio.Reader (which held the
// action line), hiding the spurious io.EOF that a locally closed stream of
// this yamux version returns before the peer's FIN.
type streamReader struct {
	st *yamux.Stream
	br *bufio.Reader
}

func (r *streamReader) Read(p []byte) (int, error) {
	for {
		// The state is taken before reading: once the peer's FIN has arrived
		// (remote-closed or closed) no more data can come, so an EOF is real.
		// Before that, an EOF comes from our own Close and is not the end.
		state := streamState(r.st)
		n, err := r.br.Read(p)
		if n > 0 || err != io.EOF {
			return n, err
		}
		if state == -1 || state == stateRemoteClose || state == stateClosed {
			return 0, io.EOF
		}
		time.Sleep(time.Millisecond)
	}
}

// drain reads r to EOF, hashing; it returns the byte count and the error
// (nil at a clean EOF).
func drain(r io.Reader, h hash.Hash) (int64, error) {
	buf := make([]byte, chunk)
	var total int64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			total += int64(n)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// ---------------------------------------------------------------- actions

type report struct {
	read, written int64
	readHash      hash.Hash
	writtenHash   hash.Hash
	err           error
	match         *bool
}

func parseCount(words []string, i int, what string) (int64, error) {
	if i >= len(words) {
		return 0, protoErr("missing %s", what)
	}
	n, err := strconv.ParseInt(words[i], 10, 64)
	if err != nil || n < 0 {
		return 0, protoErr("bad %s %q", what, words[i])
	}
	return n, nil
}

func checkAction(words []string) error {
	if len(words) == 0 {
		return protoErr("empty action")
	}
	switch words[0] {
	case "echo", "sink":
		if len(words) != 1 {
			return protoErr("%s takes no arguments", words[0])
		}
	case "send", "sink-send", "echo-check":
		if len(words) != 3 {
			return protoErr("%s takes N SEED", words[0])
		}
		if _, err := parseCount(words, 1, "N"); err != nil {
			return err
		}
		if _, err := parseCount(words, 2, "SEED"); err != nil {
			return err
		}
	case "wait":
		return checkAction(words[1:])
	default:
		return protoErr("unknown action %q", words[0])
	}
	return nil
}

// withSeedOffset returns the action with off added to its SEED, if it has one.
func withSeedOffset(words []string, off int64) []string {
	out := append([]string(nil), words...)
	for i := 0; i < len(out); i++ {
		switch out[i] {
		case "send", "sink-send", "echo-check":
			if i+2 < len(out) {
				seed, err := strconv.ParseInt(out[i+2], 10, 64)
				if err == nil {
					out[i+2] = strconv.FormatInt(seed+off, 10)
				}
			}
			return out
		}
	}
	return out
}

// runAction runs a checked action on st, reading through r.
func (p *peer) runAction(words []string, st *yamux.Stream, r io.Reader, rep *report) {
	switch words[0] {
	case "wait":
		if !p.release.Wait(p.sess.CloseChan()) {
			rep.err = yamux.ErrSessionShutdown
			st.Close()
			return
		}
		p.runAction(words[1:], st, r, rep)
	case "echo":
		buf := make([]byte, chunk)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				rep.readHash.Write(buf[:n])
				rep.read += int64(n)
				k, werr := st.Write(buf[:n])
				rep.writtenHash.Write(buf[:k])
				rep.written += int64(k)
				if werr != nil {
					rep.err = werr
					st.Close()
					return
				}
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				rep.err = err
				st.Close()
				return
			}
		}
		rep.err = st.Close()
	case "sink":
		n, err := drain(r, rep.readHash)
		rep.read = n
		if err != nil {
			rep.err = err
			st.Close()
			return
		}
		line := fmt.Sprintf("%d %s\n", n, hex.EncodeToString(rep.readHash.Sum(nil)))
		k, err := io.WriteString(st, line)
		rep.writtenHash.Write([]byte(line[:k]))
		rep.written = int64(k)
		if err != nil {
			rep.err = err
		}
		if cerr := st.Close(); rep.err == nil {
			rep.err = cerr
		}
	case "send":
		n, _ := parseCount(words, 1, "N")
		seed, _ := parseCount(words, 2, "SEED")
		k, err := sendData(st, n, uint64(seed), rep.writtenHash)
		rep.written = k
		cerr := st.Close()
		m, derr := drain(r, rep.readHash)
		rep.read = m
		for _, e := range []error{err, cerr, derr} {
			if e != nil && rep.err == nil {
				rep.err = e
			}
		}
	case "sink-send":
		n, _ := parseCount(words, 1, "N")
		seed, _ := parseCount(words, 2, "SEED")
		m, err := drain(r, rep.readHash)
		rep.read = m
		if err != nil {
			rep.err = err
			st.Close()
			return
		}
		k, err := sendData(st, n, uint64(seed), rep.writtenHash)
		rep.written = k
		rep.err = err
		if cerr := st.Close(); rep.err == nil {
			rep.err = cerr
		}
	case "echo-check":
		n, _ := parseCount(words, 1, "N")
		seed, _ := parseCount(words, 2, "SEED")
		var werr, cerr error
		done := make(chan struct{})
		go func() {
			defer close(done)
			rep.written, werr = sendData(st, n, uint64(seed), rep.writtenHash)
			cerr = st.Close()
		}()
		m, rerr := drain(r, rep.readHash)
		rep.read = m
		<-done
		for _, e := range []error{werr, cerr, rerr} {
			if e != nil && rep.err == nil {
				rep.err = e
			}
		}
		ok := rep.err == nil && rep.read == rep.written &&
			hex.EncodeToString(rep.readHash.Sum(nil)) == hex.EncodeToString(rep.writtenHash.Sum(nil))
		rep.match = &ok
	}
}

// serve runs one stream to its end and reports it.
func (p *peer) serve(st *yamux.Stream, origin, tag string, words []string) {
	br := bufio.NewReaderSize(st, chunk)
	r := &streamReader{st: st, br: br}
	rep := &report{readHash: sha256.New(), writtenHash: sha256.New()}
	if origin == "remote" {
		line, err := readLine(br, 1024)
		if err != nil {
			rep.err = err
		} else {
			words = strings.Fields(line)
			if err := checkAction(words); err != nil {
				rep.err = err
			}
		}
		if rep.err != nil {
			st.Close()
		}
	}
	if rep.err == nil {
		p.runAction(words, st, r, rep)
	}
	m := map[string]interface{}{
		"event":          "stream",
		"id":             st.StreamID(),
		"origin":         origin,
		"tag":            tag,
		"action":         strings.Join(words, " "),
		"read":           rep.read,
		"read_sha256":    hex.EncodeToString(rep.readHash.Sum(nil)),
		"written":        rep.written,
		"written_sha256": hex.EncodeToString(rep.writtenHash.Sum(nil)),
		"error":          errString(rep.err),
		"kind":           errorKind(rep.err),
	}
	if rep.match != nil {
		m["match"] = *rep.match
	}
	emit(m)
}

func readLine(br *bufio.Reader, max int) (string, error) {
	var line []byte
	for {
		b, err := br.ReadByte()
		if err != nil {
			return "", fmt.Errorf("reading the action line: %w", err)
		}
		if b == '\n' {
			return string(line), nil
		}
		line = append(line, b)
		if len(line) > max {
			return "", protoErr("action line longer than %d bytes", max)
		}
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// ---------------------------------------------------------------- session

type peer struct {
	sess    *yamux.Session
	accept  *gate
	release *gate
}

func (p *peer) acceptLoop() {
	for {
		if !p.accept.Wait(p.sess.CloseChan()) {
			return
		}
		st, err := p.sess.AcceptStream()
		if err != nil {
			return
		}
		emit(map[string]interface{}{"event": "accepted", "id": st.StreamID()})
		go p.serve(st, "remote", "", nil)
	}
}

func reply(tag string, err error, extra map[string]interface{}) {
	m := map[string]interface{}{"event": "reply", "tag": tag, "ok": err == nil, "error": errString(err), "kind": errorKind(err)}
	for k, v := range extra {
		m[k] = v
	}
	emit(m)
}

func (p *peer) command(line string) {
	words := strings.Fields(line)
	if len(words) == 0 {
		return
	}
	tag := words[0]
	if len(words) < 2 {
		reply(tag, protoErr("missing command"), nil)
		return
	}
	args := words[2:]
	switch words[1] {
	case "ping":
		rtt, err := p.sess.Ping()
		reply(tag, err, map[string]interface{}{"rtt_ns": rtt.Nanoseconds()})
	case "goaway":
		reply(tag, p.sess.GoAway(), nil)
	case "open":
		k, err := parseCount(args, 0, "K")
		if err == nil {
			err = checkAction(args[1:])
		}
		if err != nil {
			reply(tag, err, nil)
			return
		}
		ids := []uint32{}
		var streams []*yamux.Stream
		for i := int64(0); i < k; i++ {
			st, oerr := p.sess.OpenStream()
			if oerr != nil {
				err = oerr
				break
			}
			ids = append(ids, st.StreamID())
			streams = append(streams, st)
		}
		for i, st := range streams {
			go p.serve(st, "local", tag, withSeedOffset(args[1:], int64(i)))
		}
		reply(tag, err, map[string]interface{}{"ids": ids})
	case "accept":
		switch strings.Join(args, " ") {
		case "pause":
			p.accept.Close()
		case "resume":
			p.accept.Open()
		default:
			reply(tag, protoErr("accept takes pause or resume"), nil)
			return
		}
		reply(tag, nil, nil)
	case "release":
		p.release.Open()
		reply(tag, nil, nil)
	case "stats":
		reply(tag, nil, map[string]interface{}{"streams": p.sess.NumStreams(), "closed": p.sess.IsClosed()})
	case "close":
		reply(tag, p.sess.Close(), nil)
	case "quit":
		reply(tag, nil, nil)
		p.sess.Close()
		os.Exit(0)
	default:
		reply(tag, protoErr("unknown command %q", words[1]), nil)
	}
}

func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if host != "127.0.0.1" {
		return fmt.Errorf("only 127.0.0.1 is allowed, not %q", host)
	}
	return nil
}

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "yamux_peer: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	mode := flag.String("mode", "", "server (listen) or client (dial)")
	addr := flag.String("addr", "127.0.0.1:0", "listen (server) or dial (client) address, 127.0.0.1 only")
	window := flag.Uint("window", 256*1024, "MaxStreamWindowSize")
	backlog := flag.Int("backlog", 256, "AcceptBacklog")
	paused := flag.Bool("accept-paused", false, "start with the accept loop paused")
	keepalive := flag.Duration("keepalive", 0, "keepalive interval (0: off)")
	writeTimeout := flag.Duration("write-timeout", 30*time.Second, "ConnectionWriteTimeout")
	lifetime := flag.Duration("lifetime", 10*time.Minute, "exit after this long")
	flag.Parse()

	if err := loopbackOnly(*addr); err != nil {
		fatal("%v", err)
	}
	time.AfterFunc(*lifetime, func() {
		fmt.Fprintf(os.Stderr, "yamux_peer: lifetime of %v is over, exiting\n", *lifetime)
		os.Exit(3)
	})

	conf := yamux.DefaultConfig()
	conf.MaxStreamWindowSize = uint32(*window)
	conf.AcceptBacklog = *backlog
	conf.EnableKeepAlive = *keepalive > 0
	if *keepalive > 0 {
		conf.KeepAliveInterval = *keepalive
	}
	conf.ConnectionWriteTimeout = *writeTimeout
	conf.LogOutput = os.Stderr
	if err := yamux.VerifyConfig(conf); err != nil {
		fatal("bad config: %v", err)
	}

	var conn net.Conn
	var err error
	switch *mode {
	case "server":
		ln, lerr := net.Listen("tcp4", *addr)
		if lerr != nil {
			fatal("listen: %v", lerr)
		}
		emit(map[string]interface{}{"event": "listening", "addr": ln.Addr().String()})
		conn, err = ln.Accept()
		ln.Close()
		if err != nil {
			fatal("accept: %v", err)
		}
	case "client":
		conn, err = net.DialTimeout("tcp4", *addr, 10*time.Second)
		if err != nil {
			fatal("dial: %v", err)
		}
	default:
		fatal("-mode must be server or client")
	}

	var sess *yamux.Session
	if *mode == "server" {
		sess, err = yamux.Server(conn, conf)
	} else {
		sess, err = yamux.Client(conn, conf)
	}
	if err != nil {
		fatal("session: %v", err)
	}
	p := &peer{sess: sess, accept: newGate(!*paused), release: newGate(false)}
	go p.acceptLoop()
	go func() {
		<-sess.CloseChan()
		emit(map[string]interface{}{"event": "session-closed"})
	}()
	emit(map[string]interface{}{"event": "ready", "addr": conn.LocalAddr().String(), "client": *mode == "client"})

	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		go p.command(sc.Text())
	}
	sess.Close()
}
