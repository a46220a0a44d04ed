// Command tiwclient calls tiw-facade with grpc-go and the code `buf generate` writes into gen/, and
// checks what a caller relies on: the five RPCs, rich error details, deadlines, presence, health,
// and a watch stream (tiw.facade.v1.TaskWatcher).
//
//	go run . -target 127.0.0.1:50051 -limited-target 127.0.0.1:50052 -emulator http://127.0.0.1:8090
//
// -target is a facade on the TIW emulator, -limited-target a second one on the same emulator with
// TIW_RATE_LIMIT=1 and a small TIW_MAX_QUEUE_WAIT (to be refused), -emulator the emulator's URL
// (its admin endpoint injects the latency behind the deadline check and adds the watched task). It
// prints each check and exits 1 at the first failure.
//
// Both facades are dialled alike: over TLS with -ca (the CA the facades' certificates chain to), over
// mutual TLS with -cert and -key too, and with -caller every call carries that tiw-caller name
// (docs/tls.md). With -token-file every call carries the Kubernetes service-account token that
// file holds, as a bearer token (docs/authentication-clients.md). -only runs just the checks whose
// name contains its text.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	facade "tiw-facade.example/clients/go/gen/tiw/facade/v1"
	tiw "tiw-facade.example/clients/go/gen/tiw/v20190919"
)

// The emulator's seeded tasks: TIW's documented examples (see tests/test_rpcs.py).
const (
	seedSdkAppID   = 1400000001
	pushTask       = "ghucnligqtgtvk2624mb"
	stopTask       = "07b4c70bpafm1b4majmb"
	videoTask      = "ghucnligqtgtvk2624mb"
	snapshotAppID  = 1400127230
	snapshotTask   = "f2e1728c-6e87-4481-abe1-cde8542a5a10"
	createAppID    = 1400123480
	serviceName    = "tiw.v20190919.TiwService"
	defaultTimeout = 5 * time.Second
	// The watched task runs this long, then finishes: the stream sees Running, then Finished.
	watchRunSeconds = 3
	watchTimeout    = 60 * time.Second
)

type checker struct {
	tiw     tiw.TiwServiceClient
	watcher facade.TaskWatcherClient
	limited tiw.TiwServiceClient
	healthz healthpb.HealthClient
	admin   string
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "facade address")
	limited := flag.String("limited-target", "", "facade with TIW_RATE_LIMIT=1 and a small TIW_MAX_QUEUE_WAIT")
	admin := flag.String("emulator", "", "base URL of the TIW emulator behind the facades")
	caller := flag.String("caller", "", "a tiw-caller name every call carries")
	caFile := flag.String("ca", "", "PEM CA bundle to verify the facades with: TLS instead of plaintext")
	certFile := flag.String("cert", "", "PEM client certificate, with -key and -ca: mutual TLS")
	keyFile := flag.String("key", "", "PEM private key of -cert")
	tokenFile := flag.String("token-file", "", "a projected service-account token every call sends as a bearer token")
	only := flag.String("only", "", "run only the checks whose name contains this text")
	flag.Parse()
	if *limited == "" || *admin == "" {
		fail("usage", errors.New("-limited-target and -emulator are required (see -h)"))
	}
	if (*certFile == "") != (*keyFile == "") || (*certFile != "" && *caFile == "") {
		fail("usage", errors.New("-cert and -key go together, and need -ca (see -h)"))
	}
	creds, err := transportCredentials(*caFile, *certFile, *keyFile)
	if err != nil {
		fail("TLS files", err)
	}
	options := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if *caller != "" {
		// Every call of the connection: the unary calls, and the streams (a watch).
		options = append(options, grpc.WithUnaryInterceptor(callerName(*caller)),
			grpc.WithStreamInterceptor(streamCallerName(*caller)))
	}
	if *tokenFile != "" {
		token := newTokenFile(*tokenFile)
		if _, err := token.current(); err != nil { // a missing or empty file: say so before any call
			fail("token file", err)
		}
		// Per-RPC credentials: every call of the connection, unary or a stream, sends the token.
		options = append(options, grpc.WithPerRPCCredentials(token))
	}
	conn := dial(*target, options...)
	defer conn.Close()
	limitedConn := dial(*limited, options...)
	defer limitedConn.Close()
	c := checker{
		tiw:     tiw.NewTiwServiceClient(conn),
		watcher: facade.NewTaskWatcherClient(conn), // the same *grpc.ClientConn as TiwService's
		limited: tiw.NewTiwServiceClient(limitedConn),
		healthz: healthpb.NewHealthClient(conn),
		admin:   *admin,
	}

	checks := []struct {
		name string
		run  func(context.Context) error
	}{
		{"grpc.health.v1 Check: SERVING for \"\" and " + serviceName, c.health},
		{"CreateSnapshotTask (seed example), then DescribeSnapshotTask: FinishTime absent while Running", c.createAndPresence},
		{"DescribeSnapshotTask (seed example): Finished, 3 snapshots, empty ErrorMessage present", c.describeSnapshot},
		{"DescribeWhiteboardPush (seed example)", c.describePush},
		{"StopWhiteboardPush (seed example)", c.stopPush},
		{"DescribeVideoGenerationTask (seed example)", c.describeVideo},
		{"NOT_FOUND with ErrorInfo reason InvalidParameter.TaskNotFound and request_id", c.notFound},
		{"INVALID_ARGUMENT with BadRequest field violations", c.badRequest},
		{"RESOURCE_EXHAUSTED with RetryInfo from the rate-limited facade", c.refused},
		{"a 300 ms deadline against a 2 s upstream delay ends DEADLINE_EXCEEDED", c.deadline},
		{"WatchSnapshotTask: Running, then Finished, then the stream ends OK", c.watchSnapshot},
	}
	passed := 0
	for _, check := range checks {
		if !strings.Contains(check.name, *only) {
			continue
		}
		// Every call carries a deadline, and metadata the way a caller adds its own.
		ctx, cancel := context.WithTimeout(context.Background(), defaultTimeout)
		ctx = metadata.AppendToOutgoingContext(ctx, "x-client", "tiw-facade-go-example")
		err := check.run(ctx)
		cancel()
		if err != nil {
			fail(check.name, err)
		}
		fmt.Println("ok  ", check.name)
		passed++
	}
	fmt.Printf("go client: %d checks passed\n", passed)
}

func dial(target string, options ...grpc.DialOption) *grpc.ClientConn {
	conn, err := grpc.NewClient(target, options...)
	if err != nil {
		fail("dial "+target, err)
	}
	return conn
}

// callerName names every unary call of a connection with the tiw-caller metadata (docs/tls.md).
func callerName(name string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return invoker(metadata.AppendToOutgoingContext(ctx, "tiw-caller", name), method, req, reply, cc, opts...)
	}
}

// streamCallerName does the same for every stream (a watch): grpc-go keeps the two kinds apart.
func streamCallerName(name string) grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
		streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		return streamer(metadata.AppendToOutgoingContext(ctx, "tiw-caller", name), desc, cc, method, opts...)
	}
}

// transportCredentials is plaintext without a CA file; TLS with one, verifying the facade's
// certificate against it; mutual TLS with a client certificate and its key too.
func transportCredentials(caFile, certFile, keyFile string) (credentials.TransportCredentials, error) {
	if caFile == "" {
		return insecure.NewCredentials(), nil
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("no PEM certificate in %s", caFile)
	}
	config := &tls.Config{RootCAs: pool}
	if certFile != "" { // mutual TLS: the certificate names the caller
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{cert}
	}
	return credentials.NewTLS(config), nil
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", what, err)
	os.Exit(1)
}

func (c checker) health(ctx context.Context) error {
	for _, service := range []string{"", serviceName} {
		answer, err := c.healthz.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			return err
		}
		if answer.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("service %q is %v", service, answer.GetStatus())
		}
	}
	return nil
}

func (c checker) createAndPresence(ctx context.Context) error {
	created, err := c.tiw.CreateSnapshotTask(ctx, &tiw.CreateSnapshotTaskRequest{
		Whiteboard: &tiw.SnapshotWhiteboard{Width: proto.Uint64(1280), Height: proto.Uint64(720), InitParams: proto.String(`{"ratio":"16:9"}`)},
		SdkAppId:   createAppID,
		RoomId:     12345,
		// Optional fields are pointers: proto.String and friends set them.
		CallbackUrl: proto.String("http://xx/callback"),
		Cos: &tiw.SnapshotCOS{Uin: 130001358, Region: "ap-guangzhou", Bucket: "test-123070000",
			TargetDir: proto.String("snapshot/"), Domain: proto.String("xxx.file.com")},
	})
	if err != nil {
		return err
	}
	if created.TaskId == nil || created.GetTaskId() == "" || created.GetRequestId() == "" {
		return fmt.Errorf("no TaskID or RequestId in %v", created)
	}
	running, err := c.tiw.DescribeSnapshotTask(ctx, &tiw.DescribeSnapshotTaskRequest{TaskId: created.GetTaskId(), SdkAppId: createAppID})
	if err != nil {
		return err
	}
	if running.GetStatus() != "Running" || running.CreateTime == nil {
		return fmt.Errorf("want a Running task with a CreateTime, got %v", running)
	}
	if running.FinishTime != nil { // absent, not zero: the pointer is nil
		return fmt.Errorf("FinishTime is present (%d) on a running task", running.GetFinishTime())
	}
	return nil
}

func (c checker) describeSnapshot(ctx context.Context) error {
	answer, err := c.tiw.DescribeSnapshotTask(ctx, &tiw.DescribeSnapshotTaskRequest{TaskId: snapshotTask, SdkAppId: snapshotAppID})
	if err != nil {
		return err
	}
	result := answer.GetResult()
	if answer.GetStatus() != "Finished" || result.GetTotal() != 3 || len(result.GetSnapshots()) != 3 {
		return fmt.Errorf("unexpected answer %v", answer)
	}
	if result.ErrorMessage == nil || result.GetErrorMessage() != "" { // present and empty
		return fmt.Errorf("want ErrorMessage present and empty, got %v", result.ErrorMessage)
	}
	return nil
}

func (c checker) describePush(ctx context.Context) error {
	answer, err := c.tiw.DescribeWhiteboardPush(ctx, &tiw.DescribeWhiteboardPushRequest{SdkAppId: seedSdkAppID, TaskId: pushTask})
	if err != nil {
		return err
	}
	if answer.GetTaskId() != pushTask || !slices.Contains([]string{"PREPARED", "PUSHING"}, answer.GetStatus()) {
		return fmt.Errorf("unexpected answer %v", answer)
	}
	return nil
}

func (c checker) stopPush(ctx context.Context) error {
	answer, err := c.tiw.StopWhiteboardPush(ctx, &tiw.StopWhiteboardPushRequest{SdkAppId: seedSdkAppID, TaskId: stopTask})
	if err != nil {
		return err
	}
	if answer.GetRequestId() == "" {
		return fmt.Errorf("no RequestId in %v", answer)
	}
	return nil
}

func (c checker) describeVideo(ctx context.Context) error {
	answer, err := c.tiw.DescribeVideoGenerationTask(ctx, &tiw.DescribeVideoGenerationTaskRequest{SdkAppId: seedSdkAppID, TaskId: videoTask})
	if err != nil {
		return err
	}
	if answer.GetTaskId() != videoTask || answer.GetRequestId() == "" {
		return fmt.Errorf("unexpected answer %v", answer)
	}
	return nil
}

// richError is the status of a failed call, which must have the given code, and its details.
func richError(err error, want codes.Code) (*status.Status, error) {
	if err == nil {
		return nil, fmt.Errorf("the call succeeded; want %v", want)
	}
	st, ok := status.FromError(err)
	if !ok || st.Code() != want {
		return nil, fmt.Errorf("want %v, got %v", want, err)
	}
	return st, nil
}

// detail is the first detail of type T in a status (Details() decodes the google.rpc types that
// the errdetails package registers).
func detail[T proto.Message](st *status.Status) (T, error) {
	for _, d := range st.Details() {
		if found, ok := d.(T); ok {
			return found, nil
		}
	}
	var zero T
	return zero, fmt.Errorf("no %T in the status details %v", zero, st.Details())
}

func (c checker) notFound(ctx context.Context) error {
	_, err := c.tiw.DescribeSnapshotTask(ctx, &tiw.DescribeSnapshotTaskRequest{TaskId: "no-such-task", SdkAppId: snapshotAppID})
	st, err := richError(err, codes.NotFound)
	if err != nil {
		return err
	}
	info, err := detail[*errdetails.ErrorInfo](st)
	if err != nil {
		return err
	}
	if info.GetReason() != "InvalidParameter.TaskNotFound" || info.GetMetadata()["request_id"] == "" {
		return fmt.Errorf("unexpected ErrorInfo %v", info)
	}
	return nil
}

func (c checker) badRequest(ctx context.Context) error {
	_, err := c.tiw.CreateSnapshotTask(ctx, &tiw.CreateSnapshotTaskRequest{
		Whiteboard: &tiw.SnapshotWhiteboard{Width: proto.Uint64(4000)}, RoomId: 1,
	})
	st, err := richError(err, codes.InvalidArgument)
	if err != nil {
		return err
	}
	bad, err := detail[*errdetails.BadRequest](st)
	if err != nil {
		return err
	}
	var fields []string
	for _, violation := range bad.GetFieldViolations() {
		fields = append(fields, violation.GetField())
	}
	for _, want := range []string{"Whiteboard.Width", "SdkAppId"} {
		if !slices.Contains(fields, want) {
			return fmt.Errorf("no violation for %s in %v", want, fields)
		}
	}
	return nil
}

func (c checker) refused(ctx context.Context) error {
	request := &tiw.DescribeWhiteboardPushRequest{SdkAppId: seedSdkAppID, TaskId: pushTask}
	// One call a second passes; the next one within the second is refused at once.
	for range 5 {
		_, err := c.limited.DescribeWhiteboardPush(ctx, request)
		if err == nil {
			continue
		}
		st, err := richError(err, codes.ResourceExhausted)
		if err != nil {
			return err
		}
		retry, err := detail[*errdetails.RetryInfo](st)
		if err != nil {
			return err
		}
		if retry.GetRetryDelay().AsDuration() <= 0 {
			return fmt.Errorf("RetryInfo without a delay: %v", retry)
		}
		fmt.Printf("      refused; RetryInfo says retry in %v\n", retry.GetRetryDelay().AsDuration())
		return nil
	}
	return errors.New("5 calls in a row were all admitted")
}

func (c checker) deadline(ctx context.Context) error {
	action := "DescribeVideoGenerationTask"
	if err := c.emulatorAdmin(http.MethodPost, "/_emulator/faults", fmt.Sprintf(`{"kind": "latency", "action": %q, "delay": 2}`, action)); err != nil {
		return err
	}
	defer c.emulatorAdmin(http.MethodDelete, "/_emulator/faults?action="+action, "")
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	// A task nobody asked about: the facade has no cached answer to give instead of waiting for TIW.
	taskID := fmt.Sprintf("deadline-go-%d", time.Now().UnixNano())
	_, err := c.tiw.DescribeVideoGenerationTask(short, &tiw.DescribeVideoGenerationTaskRequest{SdkAppId: seedSdkAppID, TaskId: taskID})
	st, err := richError(err, codes.DeadlineExceeded)
	if err != nil {
		return err
	}
	// The facade answers just before the deadline (ErrorInfo UPSTREAM_TIMEOUT); on a slow machine
	// the client's own deadline may fire first, which is DEADLINE_EXCEEDED without details.
	if info, err := detail[*errdetails.ErrorInfo](st); err == nil {
		fmt.Printf("      ErrorInfo reason %s\n", info.GetReason())
	}
	return nil
}

// watchSnapshot watches a task until its final state. The stream sends the current answer at once
// and then each change, as the DescribeSnapshotTask responses themselves; Recv returns io.EOF when
// the stream ends OK (after Finished), and the status of any other end as its error. On UNAVAILABLE
// (the replica stopped) a caller watches again: the new stream starts with the current state.
func (c checker) watchSnapshot(ctx context.Context) error {
	// A watch lasts as long as its task, not as long as a call: a deadline of its own (the
	// metadata stays).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), watchTimeout)
	defer cancel()
	taskID := fmt.Sprintf("watch-go-%d", time.Now().UnixNano())
	task := fmt.Sprintf(`{"Kind": "snapshot", "TaskId": %q, "SdkAppId": %d, "RunSeconds": %d}`, taskID, seedSdkAppID, watchRunSeconds)
	if err := c.emulatorAdmin(http.MethodPost, "/_emulator/tasks", task); err != nil {
		return err
	}
	stream, err := c.watcher.WatchSnapshotTask(ctx, &facade.WatchSnapshotTaskRequest{
		Request: &tiw.DescribeSnapshotTaskRequest{TaskId: taskID, SdkAppId: seedSdkAppID},
	})
	if err != nil {
		return err
	}
	var seen []string
	for {
		answer, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("after %v: %w", seen, err)
		}
		seen = append(seen, answer.GetStatus())
	}
	if len(seen) < 2 || seen[0] != "Running" || seen[len(seen)-1] != "Finished" {
		return fmt.Errorf("want Running first and Finished last, saw %v", seen)
	}
	fmt.Printf("      saw %v\n", seen)
	return nil
}

func (c checker) emulatorAdmin(method, path, body string) error {
	request, err := http.NewRequest(method, c.admin+path, bytes.NewBufferString(body))
	if err != nil {
		return err
	}
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		return err
	}
	defer response.Body.Close()
	if response.StatusCode != http.StatusOK {
		return fmt.Errorf("emulator %s %s: HTTP %d", method, path, response.StatusCode)
	}
	return nil
}
