package com.tiwfacade.example;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Message;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
import com.tiwfacade.facade.v1.TaskWatcherGrpc;
import com.tiwfacade.facade.v1.WatchSnapshotTaskRequest;
import com.tiwfacade.tiw.v20190919.CreateSnapshotTaskRequest;
import com.tiwfacade.tiw.v20190919.CreateSnapshotTaskResponse;
import com.tiwfacade.tiw.v20190919.DescribeSnapshotTaskRequest;
import com.tiwfacade.tiw.v20190919.DescribeSnapshotTaskResponse;
import com.tiwfacade.tiw.v20190919.DescribeVideoGenerationTaskRequest;
import com.tiwfacade.tiw.v20190919.DescribeWhiteboardPushRequest;
import com.tiwfacade.tiw.v20190919.DescribeWhiteboardPushResponse;
import com.tiwfacade.tiw.v20190919.SnapshotCOS;
import com.tiwfacade.tiw.v20190919.SnapshotResult;
import com.tiwfacade.tiw.v20190919.SnapshotWhiteboard;
import com.tiwfacade.tiw.v20190919.StopWhiteboardPushRequest;
import com.tiwfacade.tiw.v20190919.TiwServiceGrpc;
import com.tiwfacade.tiw.v20190919.TiwServiceGrpc.TiwServiceBlockingStub;
import io.grpc.ChannelCredentials;
import io.grpc.CompositeChannelCredentials;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import java.io.File;
import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * Calls tiw-facade with grpc-java and the classes {@code buf generate} writes into gen/, and checks
 * what a caller relies on: the five RPCs, rich error details, deadlines, presence, health, and a
 * watch stream (tiw.facade.v1.TaskWatcher).
 *
 * <pre>java -cp ... com.tiwfacade.example.Main --target 127.0.0.1:50051 \
 *     --limited-target 127.0.0.1:50052 --emulator http://127.0.0.1:8090</pre>
 *
 * <p>--target is a facade on the TIW emulator, --limited-target a second one on the same emulator
 * with TIW_RATE_LIMIT=1 and a small TIW_MAX_QUEUE_WAIT (to be refused), --emulator the emulator's URL
 * (its admin endpoint injects the latency behind the deadline check and adds the watched task). It
 * prints each check and exits 1 at the first failure.
 *
 * <p>Both facades are dialled alike: over TLS with --ca (the CA the facades' certificates chain to),
 * over mutual TLS with --cert and --key too, and with --caller every call carries that tiw-caller
 * name (docs/tls.md). With --token-file every call carries the Kubernetes service-account token that
 * file holds, as a bearer token (docs/authentication-clients.md). --only runs just the checks whose
 * name contains its text.
 */
public final class Main {
  // The emulator's seeded tasks: TIW's documented examples (see tests/test_rpcs.py).
  private static final long SEED_SDK_APP_ID = 1400000001L;
  private static final String PUSH_TASK = "ghucnligqtgtvk2624mb";
  private static final String STOP_TASK = "07b4c70bpafm1b4majmb";
  private static final String VIDEO_TASK = "ghucnligqtgtvk2624mb";
  private static final long SNAPSHOT_APP_ID = 1400127230L;
  private static final String SNAPSHOT_TASK = "f2e1728c-6e87-4481-abe1-cde8542a5a10";
  private static final long CREATE_APP_ID = 1400123480L;
  private static final String SERVICE = "tiw.v20190919.TiwService";
  // The watched task runs this long, then finishes: the stream sees Running, then Finished.
  private static final int WATCH_RUN_SECONDS = 3;

  private interface Check {
    void run() throws Exception;
  }

  private static final class CheckFailed extends Exception {
    CheckFailed(String message) {
      super(message);
    }
  }

  private final TiwServiceBlockingStub tiw;
  private final TaskWatcherGrpc.TaskWatcherBlockingStub watcher;
  private final TiwServiceBlockingStub limited;
  private final HealthGrpc.HealthBlockingStub health;
  private final String emulator;

  private Main(ManagedChannel channel, ManagedChannel limitedChannel, String emulator) {
    // Metadata the way a caller adds its own: an interceptor that attaches headers to every call.
    Metadata headers = new Metadata();
    headers.put(Metadata.Key.of("x-client", Metadata.ASCII_STRING_MARSHALLER), "tiw-facade-java-example");
    this.tiw = TiwServiceGrpc.newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers));
    this.watcher = TaskWatcherGrpc.newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers));
    this.limited = TiwServiceGrpc.newBlockingStub(limitedChannel);
    this.health = HealthGrpc.newBlockingStub(channel);
    this.emulator = emulator;
  }

  public static void main(String[] argv) throws Exception {
    Map<String, String> args = new HashMap<>();
    for (int i = 0; i + 1 < argv.length; i += 2) {
      args.put(argv[i], argv[i + 1]);
    }
    String target = args.getOrDefault("--target", "127.0.0.1:50051");
    String limitedTarget = args.get("--limited-target");
    String emulator = args.get("--emulator");
    String caller = args.get("--caller");
    String ca = args.get("--ca");
    String cert = args.get("--cert");
    String key = args.get("--key");
    String tokenFile = args.get("--token-file");
    String only = args.getOrDefault("--only", "");
    boolean tlsFlagsAgree = (cert == null) == (key == null) && (cert == null || ca != null);
    if (limitedTarget == null || emulator == null || !tlsFlagsAgree) {
      System.err.println("usage: Main --target HOST:PORT --limited-target HOST:PORT --emulator URL"
          + " [--caller NAME] [--ca FILE [--cert FILE --key FILE]] [--token-file FILE] [--only TEXT]");
      System.exit(2);
    }
    ChannelCredentials credentials = credentials(ca, cert, key);
    if (tokenFile != null) {
      TokenFileCredentials token = new TokenFileCredentials(Path.of(tokenFile));
      try {
        token.current(); // a missing or empty file: say so before any call
      } catch (IOException e) {
        System.err.println("FAIL token file: " + e);
        System.exit(1);
      }
      // Call credentials on the channel: every call of every stub, unary or streaming, sends the token.
      credentials = CompositeChannelCredentials.create(credentials, token);
    }
    ManagedChannel channel = channel(target, credentials, caller);
    ManagedChannel limitedChannel = channel(limitedTarget, credentials, caller);
    Main main = new Main(channel, limitedChannel, emulator);
    Map<String, Check> checks = new java.util.LinkedHashMap<>();
    checks.put("grpc.health.v1 Check: SERVING for \"\" and " + SERVICE, main::health);
    checks.put("CreateSnapshotTask (seed example), then DescribeSnapshotTask: FinishTime absent while Running",
        main::createAndPresence);
    checks.put("DescribeSnapshotTask (seed example): Finished, 3 snapshots, empty ErrorMessage present",
        main::describeSnapshot);
    checks.put("DescribeWhiteboardPush (seed example)", main::describePush);
    checks.put("StopWhiteboardPush (seed example)", main::stopPush);
    checks.put("DescribeVideoGenerationTask (seed example)", main::describeVideo);
    checks.put("NOT_FOUND with ErrorInfo reason InvalidParameter.TaskNotFound and request_id", main::notFound);
    checks.put("INVALID_ARGUMENT with BadRequest field violations", main::badRequest);
    checks.put("RESOURCE_EXHAUSTED with RetryInfo from the rate-limited facade", main::refused);
    checks.put("a 300 ms deadline against a 2 s upstream delay ends DEADLINE_EXCEEDED", main::deadline);
    checks.put("WatchSnapshotTask: Running, then Finished, then the stream ends OK", main::watchSnapshot);
    checks.keySet().removeIf(name -> !name.contains(only));
    try {
      for (Map.Entry<String, Check> check : checks.entrySet()) {
        try {
          check.getValue().run();
        } catch (Exception e) {
          System.err.println("FAIL " + check.getKey() + ": " + e);
          System.exit(1);
        }
        System.out.println("ok   " + check.getKey());
      }
      System.out.println("java client: " + checks.size() + " checks passed");
    } finally {
      channel.shutdownNow();
      limitedChannel.shutdownNow();
    }
  }

  /**
   * Plaintext without a CA file; TLS with one, verifying the facade's certificate against it; mutual
   * TLS with a client certificate and its key too.
   */
  private static ChannelCredentials credentials(String ca, String cert, String key) throws IOException {
    if (ca == null) {
      return InsecureChannelCredentials.create();
    }
    TlsChannelCredentials.Builder tls = TlsChannelCredentials.newBuilder().trustManager(new File(ca));
    if (cert != null) { // mutual TLS: the certificate names the caller
      tls.keyManager(new File(cert), new File(key));
    }
    return tls.build();
  }

  /** A channel whose every call, unary or streaming, carries the tiw-caller name (docs/tls.md). */
  private static ManagedChannel channel(String target, ChannelCredentials credentials, String caller) {
    ManagedChannelBuilder<?> builder = Grpc.newChannelBuilder(target, credentials);
    if (caller != null) {
      Metadata headers = new Metadata();
      headers.put(Metadata.Key.of("tiw-caller", Metadata.ASCII_STRING_MARSHALLER), caller);
      builder.intercept(MetadataUtils.newAttachHeadersInterceptor(headers));
    }
    return builder.build();
  }

  /** Every call gets a deadline: a stub's withDeadlineAfter applies to the next call made with it. */
  private TiwServiceBlockingStub call() {
    return tiw.withDeadlineAfter(5, TimeUnit.SECONDS);
  }

  private static void expect(boolean condition, String message) throws CheckFailed {
    if (!condition) {
      throw new CheckFailed(message);
    }
  }

  private void health() throws CheckFailed {
    for (String service : List.of("", SERVICE)) {
      HealthCheckResponse answer = health.withDeadlineAfter(5, TimeUnit.SECONDS)
          .check(HealthCheckRequest.newBuilder().setService(service).build());
      expect(answer.getStatus() == HealthCheckResponse.ServingStatus.SERVING,
          "service \"" + service + "\" is " + answer.getStatus());
    }
  }

  private void createAndPresence() throws CheckFailed {
    CreateSnapshotTaskResponse created = call().createSnapshotTask(CreateSnapshotTaskRequest.newBuilder()
        .setWhiteboard(SnapshotWhiteboard.newBuilder().setWidth(1280).setHeight(720)
            .setInitParams("{\"ratio\":\"16:9\"}"))
        .setSdkAppId(CREATE_APP_ID)
        .setRoomId(12345)
        .setCallbackUrl("http://xx/callback")
        .setCos(SnapshotCOS.newBuilder().setUin(130001358).setRegion("ap-guangzhou")
            .setBucket("test-123070000").setTargetDir("snapshot/").setDomain("xxx.file.com"))
        .build());
    expect(created.hasTaskId() && !created.getTaskId().isEmpty() && !created.getRequestId().isEmpty(),
        "no TaskID or RequestId in " + created);
    DescribeSnapshotTaskResponse running = call().describeSnapshotTask(DescribeSnapshotTaskRequest.newBuilder()
        .setTaskId(created.getTaskId()).setSdkAppId(CREATE_APP_ID).build());
    expect(running.getStatus().equals("Running") && running.hasCreateTime(),
        "want a Running task with a CreateTime, got " + running);
    // Absent, not zero: hasFinishTime() tells them apart.
    expect(!running.hasFinishTime(), "FinishTime is present (" + running.getFinishTime() + ") on a running task");
  }

  private void describeSnapshot() throws CheckFailed {
    DescribeSnapshotTaskResponse answer = call().describeSnapshotTask(DescribeSnapshotTaskRequest.newBuilder()
        .setTaskId(SNAPSHOT_TASK).setSdkAppId(SNAPSHOT_APP_ID).build());
    SnapshotResult result = answer.getResult();
    expect(answer.getStatus().equals("Finished") && result.getTotal() == 3 && result.getSnapshotsCount() == 3,
        "unexpected answer " + answer);
    expect(result.hasErrorMessage() && result.getErrorMessage().isEmpty(),
        "want ErrorMessage present and empty in " + result);
  }

  private void describePush() throws CheckFailed {
    DescribeWhiteboardPushResponse answer = call().describeWhiteboardPush(DescribeWhiteboardPushRequest.newBuilder()
        .setSdkAppId(SEED_SDK_APP_ID).setTaskId(PUSH_TASK).build());
    expect(answer.getTaskId().equals(PUSH_TASK) && List.of("PREPARED", "PUSHING").contains(answer.getStatus()),
        "unexpected answer " + answer);
  }

  private void stopPush() throws CheckFailed {
    var answer = call().stopWhiteboardPush(StopWhiteboardPushRequest.newBuilder()
        .setSdkAppId(SEED_SDK_APP_ID).setTaskId(STOP_TASK).build());
    expect(!answer.getRequestId().isEmpty(), "no RequestId in " + answer);
  }

  private void describeVideo() throws CheckFailed {
    var answer = call().describeVideoGenerationTask(DescribeVideoGenerationTaskRequest.newBuilder()
        .setSdkAppId(SEED_SDK_APP_ID).setTaskId(VIDEO_TASK).build());
    expect(answer.getTaskId().equals(VIDEO_TASK) && !answer.getRequestId().isEmpty(), "unexpected answer " + answer);
  }

  /** The google.rpc.Status of a call that must fail with {@code want}. */
  private static com.google.rpc.Status failure(Runnable call, Status.Code want) throws CheckFailed {
    try {
      call.run();
    } catch (StatusRuntimeException e) {
      expect(e.getStatus().getCode() == want, "want " + want + ", got " + e.getStatus());
      com.google.rpc.Status status = StatusProto.fromThrowable(e);
      return status != null ? status : com.google.rpc.Status.getDefaultInstance();
    }
    throw new CheckFailed("the call succeeded; want " + want);
  }

  /** The first detail of the given type, unpacked from its google.protobuf.Any. */
  private static <T extends Message> T detail(com.google.rpc.Status status, Class<T> type)
      throws CheckFailed, InvalidProtocolBufferException {
    for (Any any : status.getDetailsList()) {
      if (any.is(type)) {
        return any.unpack(type);
      }
    }
    throw new CheckFailed("no " + type.getSimpleName() + " in the status details " + status.getDetailsList());
  }

  private void notFound() throws Exception {
    com.google.rpc.Status status = failure(() -> call().describeSnapshotTask(DescribeSnapshotTaskRequest.newBuilder()
        .setTaskId("no-such-task").setSdkAppId(SNAPSHOT_APP_ID).build()), Status.Code.NOT_FOUND);
    ErrorInfo info = detail(status, ErrorInfo.class);
    expect(info.getReason().equals("InvalidParameter.TaskNotFound")
        && !info.getMetadataOrDefault("request_id", "").isEmpty(), "unexpected ErrorInfo " + info);
  }

  private void badRequest() throws Exception {
    com.google.rpc.Status status = failure(() -> call().createSnapshotTask(CreateSnapshotTaskRequest.newBuilder()
        .setWhiteboard(SnapshotWhiteboard.newBuilder().setWidth(4000)).setRoomId(1).build()),
        Status.Code.INVALID_ARGUMENT);
    List<String> fields = detail(status, BadRequest.class).getFieldViolationsList().stream()
        .map(BadRequest.FieldViolation::getField).toList();
    expect(fields.containsAll(List.of("Whiteboard.Width", "SdkAppId")), "unexpected violations " + fields);
  }

  private void refused() throws Exception {
    DescribeWhiteboardPushRequest request = DescribeWhiteboardPushRequest.newBuilder()
        .setSdkAppId(SEED_SDK_APP_ID).setTaskId(PUSH_TASK).build();
    // One call a second passes; the next one within the second is refused at once.
    for (int i = 0; i < 5; i++) {
      try {
        limited.withDeadlineAfter(5, TimeUnit.SECONDS).describeWhiteboardPush(request);
      } catch (StatusRuntimeException e) {
        expect(e.getStatus().getCode() == Status.Code.RESOURCE_EXHAUSTED, "want RESOURCE_EXHAUSTED, got " + e);
        RetryInfo retry = detail(StatusProto.fromThrowable(e), RetryInfo.class);
        var delay = retry.getRetryDelay();
        expect(delay.getSeconds() > 0 || delay.getNanos() > 0, "RetryInfo without a delay: " + retry);
        System.out.printf("      refused; RetryInfo says retry in %d.%09d s%n", delay.getSeconds(), delay.getNanos());
        return;
      }
    }
    throw new CheckFailed("5 calls in a row were all admitted");
  }

  private void deadline() throws Exception {
    String action = "DescribeVideoGenerationTask";
    admin("POST", "/_emulator/faults", "{\"kind\": \"latency\", \"action\": \"" + action + "\", \"delay\": 2}");
    // A task nobody asked about: the facade has no cached answer to give instead of waiting for TIW.
    String taskId = "deadline-java-" + java.util.UUID.randomUUID();
    try {
      com.google.rpc.Status status = failure(() -> tiw.withDeadlineAfter(300, TimeUnit.MILLISECONDS)
          .describeVideoGenerationTask(DescribeVideoGenerationTaskRequest.newBuilder()
              .setSdkAppId(SEED_SDK_APP_ID).setTaskId(taskId).build()), Status.Code.DEADLINE_EXCEEDED);
      // The facade answers just before the deadline (ErrorInfo UPSTREAM_TIMEOUT); on a slow machine
      // the client's own deadline may fire first, which is DEADLINE_EXCEEDED without details.
      for (Any any : status.getDetailsList()) {
        if (any.is(ErrorInfo.class)) {
          System.out.println("      ErrorInfo reason " + any.unpack(ErrorInfo.class).getReason());
        }
      }
    } finally {
      admin("DELETE", "/_emulator/faults?action=" + action, "");
    }
  }

  /**
   * Watches a task until its final state. The stream sends the current answer at once and then each
   * change, as the DescribeSnapshotTask responses themselves, and ends OK after Finished. On
   * UNAVAILABLE (the replica stopped) a caller watches again: the new stream starts with the current
   * state.
   */
  private void watchSnapshot() throws Exception {
    String taskId = "watch-java-" + java.util.UUID.randomUUID();
    admin("POST", "/_emulator/tasks", "{\"Kind\": \"snapshot\", \"TaskId\": \"" + taskId + "\", \"SdkAppId\": "
        + SEED_SDK_APP_ID + ", \"RunSeconds\": " + WATCH_RUN_SECONDS + "}");
    // A watch lasts as long as its task, not as long as a call: a deadline of its own.
    Iterator<DescribeSnapshotTaskResponse> stream = watcher.withDeadlineAfter(60, TimeUnit.SECONDS)
        .watchSnapshotTask(WatchSnapshotTaskRequest.newBuilder()
            .setRequest(DescribeSnapshotTaskRequest.newBuilder().setTaskId(taskId).setSdkAppId(SEED_SDK_APP_ID))
            .build());
    List<String> seen = new ArrayList<>();
    // Ends when the stream ends OK; any other end throws StatusRuntimeException
    // (StatusProto.fromThrowable(e) has the details).
    stream.forEachRemaining(answer -> seen.add(answer.getStatus()));
    expect(seen.size() >= 2 && seen.get(0).equals("Running") && seen.get(seen.size() - 1).equals("Finished"),
        "want Running first and Finished last, saw " + seen);
    System.out.println("      saw " + seen);
  }

  private void admin(String method, String path, String body) throws Exception {
    HttpRequest request = HttpRequest.newBuilder(URI.create(emulator + path))
        .method(method, HttpRequest.BodyPublishers.ofString(body)).build();
    HttpResponse<String> response = HttpClient.newHttpClient().send(request, HttpResponse.BodyHandlers.ofString());
    expect(response.statusCode() == 200, "emulator " + method + " " + path + ": HTTP " + response.statusCode());
  }
}
