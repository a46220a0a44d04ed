// Calls tiw-facade with @grpc/grpc-js and the TypeScript ts-proto writes into src/gen/, and checks
// what a caller relies on: the five RPCs, rich error details, deadlines, presence, health, and a
// watch stream (tiw.facade.v1.TaskWatcher).
//
//   node dist/main.js --target 127.0.0.1:50051 --limited-target 127.0.0.1:50052 --emulator http://127.0.0.1:8090
//
// --target is a facade on the TIW emulator, --limited-target a second one on the same emulator with
// TIW_RATE_LIMIT=1 and a small TIW_MAX_QUEUE_WAIT (to be refused), --emulator the emulator's URL
// (its admin endpoint injects the latency behind the deadline check and adds the watched task). It
// prints each check and exits 1 at the first failure.
//
// Both facades are dialled alike: over TLS with --ca (the CA the facades' certificates chain to), over
// mutual TLS with --cert and --key too, and with --caller every call carries that tiw-caller name
// (docs/tls.md). With --token-file every call carries the Kubernetes service-account token that
// file holds, as a bearer token (docs/authentication-clients.md). --only runs just the checks whose
// name contains its text.
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import {
  credentials,
  InterceptingCall,
  Metadata,
  status as Code,
  type CallOptions,
  type ChannelCredentials,
  type ClientOptions,
  type Interceptor,
  type ServiceError,
} from "@grpc/grpc-js";
import { Status } from "./gen/google/rpc/status";
import { BadRequest, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details";
import { HealthCheckResponse_ServingStatus, HealthClient } from "./gen/health/v1/health";
import {
  CreateSnapshotTaskRequest,
  TiwServiceClient,
  type DescribeSnapshotTaskRequest,
  type DescribeSnapshotTaskResponse,
} from "./gen/tiw/v20190919/tiw";
import { TaskWatcherClient } from "./gen/tiw/facade/v1/watcher";
import { bearerToken, tokenReader, withCallCredentials } from "./token";

// The emulator's seeded tasks: TIW's documented examples (see tests/test_rpcs.py).
const SEED_SDK_APP_ID = 1400000001;
const PUSH_TASK = "ghucnligqtgtvk2624mb";
const STOP_TASK = "07b4c70bpafm1b4majmb";
const VIDEO_TASK = "ghucnligqtgtvk2624mb";
const SNAPSHOT_APP_ID = 1400127230;
const SNAPSHOT_TASK = "f2e1728c-6e87-4481-abe1-cde8542a5a10";
const CREATE_APP_ID = 1400123480;
const SERVICE = "tiw.v20190919.TiwService";
// The watched task runs this long, then finishes: the stream sees Running, then Finished.
const WATCH_RUN_SECONDS = 3;

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    "limited-target": { type: "string" },
    emulator: { type: "string" },
    caller: { type: "string" },
    ca: { type: "string" },
    cert: { type: "string" },
    key: { type: "string" },
    "token-file": { type: "string" },
    only: { type: "string", default: "" },
  },
});
const tlsFlagsAgree = !args.cert === !args.key && (!args.cert || !!args.ca);
if (!args["limited-target"] || !args.emulator || !tlsFlagsAgree) {
  console.error(
    "usage: main.js --target HOST:PORT --limited-target HOST:PORT --emulator URL" +
      " [--caller NAME] [--ca FILE [--cert FILE --key FILE]] [--token-file FILE] [--only TEXT]",
  );
  process.exit(2);
}

// Names every call of a client, unary or streaming, with the tiw-caller metadata (docs/tls.md).
const callerName = (name: string): Interceptor => (options, nextCall) =>
  new InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set("tiw-caller", name);
      next(metadata, listener);
    },
  });

// Plaintext without --ca; TLS with it, verifying the facade's certificate against that CA; mutual
// TLS with --cert and --key too.
const channelCredentials: ChannelCredentials = args.ca
  ? credentials.createSsl(
      readFileSync(args.ca),
      args.key ? readFileSync(args.key) : null, // mutual TLS only
      args.cert ? readFileSync(args.cert) : null,
    )
  : credentials.createInsecure();
const options: Partial<ClientOptions> = args.caller ? { interceptors: [callerName(args.caller)] } : {};
if (args["token-file"]) {
  const token = tokenReader(args["token-file"]);
  try {
    token(); // a missing or empty file: say so before any call
  } catch (error) {
    console.error(`FAIL token file: ${error instanceof Error ? error.message : error}`);
    process.exit(1);
  }
  // Call credentials on every call of every client, unary or streaming: each sends the token.
  options.interceptors = [...(options.interceptors ?? []), withCallCredentials(bearerToken(token))];
}
const tiw = new TiwServiceClient(args.target!, channelCredentials, options);
const watcher = new TaskWatcherClient(args.target!, channelCredentials, options);
const limited = new TiwServiceClient(args["limited-target"], channelCredentials, options);
const health = new HealthClient(args.target!, channelCredentials, options);

// Metadata the way a caller adds its own, and a deadline on every call (an absolute time).
function metadata(): Metadata {
  const headers = new Metadata();
  headers.set("x-client", "tiw-facade-node-example");
  return headers;
}
function within(ms: number): Partial<CallOptions> {
  return { deadline: new Date(Date.now() + ms) };
}

type Unary<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => unknown;

// A generated grpc-js method as a promise.
function call<Req, Res>(method: Unary<Req, Res>, client: object, request: Req, ms = 5000): Promise<Res> {
  return new Promise((resolve, reject) =>
    method.call(client, request, metadata(), within(ms), (error, response) => (error ? reject(error) : resolve(response))),
  );
}

function expect(condition: boolean, message: string): asserts condition {
  if (!condition) throw new Error(message);
}

// The google.rpc.Status of a call that must fail with `want`: grpc-js leaves it, binary, in the
// `grpc-status-details-bin` trailer.
async function failure(pending: Promise<unknown>, want: Code): Promise<Status> {
  const error = await pending.then(
    () => {
      throw new Error(`the call succeeded; want ${Code[want]}`);
    },
    (e: ServiceError) => e,
  );
  expect(error.code === want, `want ${Code[want]}, got ${Code[error.code]}: ${error.details}`);
  const [bin] = error.metadata?.get("grpc-status-details-bin") ?? [];
  return bin instanceof Buffer ? Status.decode(bin) : Status.fromPartial({ code: error.code });
}

type Decoder<T> = { decode(input: Uint8Array): T };
function detail<T>(status: Status, type: string, decoder: Decoder<T>): T {
  const any = status.details.find((d) => d.typeUrl === `type.googleapis.com/${type}`);
  expect(any !== undefined, `no ${type} in the status details ${status.details.map((d) => d.typeUrl)}`);
  return decoder.decode(any.value);
}

async function admin(method: string, path: string, body?: string): Promise<void> {
  const answer = await fetch(args.emulator + path, { method, body });
  expect(answer.ok, `emulator ${method} ${path}: HTTP ${answer.status}`);
}

const describeSnapshot = (request: DescribeSnapshotTaskRequest): Promise<DescribeSnapshotTaskResponse> =>
  call(tiw.describeSnapshotTask, tiw, request);

const checks: [string, () => Promise<void>][] = [
  [
    `grpc.health.v1 Check: SERVING for "" and ${SERVICE}`,
    async () => {
      for (const service of ["", SERVICE]) {
        const answer = await call(health.check, health, { service });
        expect(answer.status === HealthCheckResponse_ServingStatus.SERVING, `service "${service}" is ${answer.status}`);
      }
    },
  ],
  [
    "CreateSnapshotTask (seed example), then DescribeSnapshotTask: FinishTime absent while Running",
    async () => {
      // fromJSON reads TIW's own parameter names (the json_name of each field).
      const request = CreateSnapshotTaskRequest.fromJSON({
        COS: { TargetDir: "snapshot/", Region: "ap-guangzhou", Bucket: "test-123070000", Domain: "xxx.file.com", Uin: 130001358 },
        Whiteboard: { Width: 1280, InitParams: '{"ratio":"16:9"}', Height: 720 },
        RoomId: 12345,
        SdkAppId: CREATE_APP_ID,
        CallbackURL: "http://xx/callback",
      });
      const created = await call(tiw.createSnapshotTask, tiw, request);
      expect(!!created.taskId && !!created.requestId, `no TaskID or RequestId in ${JSON.stringify(created)}`);
      const running = await describeSnapshot({ taskId: created.taskId, sdkAppId: CREATE_APP_ID });
      expect(running.status === "Running" && running.createTime !== undefined, `want a Running task, got ${JSON.stringify(running)}`);
      // Absent, not zero: an unset optional field is undefined.
      expect(running.finishTime === undefined, `FinishTime is present (${running.finishTime}) on a running task`);
    },
  ],
  [
    "DescribeSnapshotTask (seed example): Finished, 3 snapshots, empty ErrorMessage present",
    async () => {
      const answer = await describeSnapshot({ taskId: SNAPSHOT_TASK, sdkAppId: SNAPSHOT_APP_ID });
      const result = answer.result;
      expect(answer.status === "Finished" && result?.total === 3 && result.snapshots.length === 3, `unexpected answer ${JSON.stringify(answer)}`);
      expect(result.errorMessage === "", `want ErrorMessage present and empty, got ${result.errorMessage}`);
    },
  ],
  [
    "DescribeWhiteboardPush (seed example)",
    async () => {
      const answer = await call(tiw.describeWhiteboardPush, tiw, { sdkAppId: SEED_SDK_APP_ID, taskId: PUSH_TASK });
      expect(answer.taskId === PUSH_TASK && ["PREPARED", "PUSHING"].includes(answer.status), `unexpected answer ${JSON.stringify(answer)}`);
    },
  ],
  [
    "StopWhiteboardPush (seed example)",
    async () => {
      const answer = await call(tiw.stopWhiteboardPush, tiw, { sdkAppId: SEED_SDK_APP_ID, taskId: STOP_TASK });
      expect(!!answer.requestId, `no RequestId in ${JSON.stringify(answer)}`);
    },
  ],
  [
    "DescribeVideoGenerationTask (seed example)",
    async () => {
      const answer = await call(tiw.describeVideoGenerationTask, tiw, { sdkAppId: SEED_SDK_APP_ID, taskId: VIDEO_TASK });
      expect(answer.taskId === VIDEO_TASK && !!answer.requestId, `unexpected answer ${JSON.stringify(answer)}`);
    },
  ],
  [
    "NOT_FOUND with ErrorInfo reason InvalidParameter.TaskNotFound and request_id",
    async () => {
      const status = await failure(describeSnapshot({ taskId: "no-such-task", sdkAppId: SNAPSHOT_APP_ID }), Code.NOT_FOUND);
      const info = detail(status, "google.rpc.ErrorInfo", ErrorInfo);
      expect(info.reason === "InvalidParameter.TaskNotFound" && !!info.metadata.request_id, `unexpected ErrorInfo ${JSON.stringify(info)}`);
    },
  ],
  [
    "INVALID_ARGUMENT with BadRequest field violations",
    async () => {
      const bad = CreateSnapshotTaskRequest.fromPartial({ whiteboard: { width: 4000 }, roomId: 1 });
      const status = await failure(call(tiw.createSnapshotTask, tiw, bad), Code.INVALID_ARGUMENT);
      const fields = detail(status, "google.rpc.BadRequest", BadRequest).fieldViolations.map((v) => v.field);
      for (const want of ["Whiteboard.Width", "SdkAppId"]) {
        expect(fields.includes(want), `no violation for ${want} in ${fields}`);
      }
    },
  ],
  [
    "RESOURCE_EXHAUSTED with RetryInfo from the rate-limited facade",
    async () => {
      // One call a second passes; the next one within the second is refused at once.
      for (let i = 0; i < 5; i++) {
        const outcome = await call(limited.describeWhiteboardPush, limited, { sdkAppId: SEED_SDK_APP_ID, taskId: PUSH_TASK }).then(
          () => null,
          (e: ServiceError) => e,
        );
        if (outcome === null) continue;
        const status = await failure(Promise.reject(outcome), Code.RESOURCE_EXHAUSTED);
        const delay = detail(status, "google.rpc.RetryInfo", RetryInfo).retryDelay;
        expect(!!delay && (delay.seconds > 0 || delay.nanos > 0), `RetryInfo without a delay: ${JSON.stringify(delay)}`);
        console.log(`      refused; RetryInfo says retry in ${delay.seconds + delay.nanos / 1e9} s`);
        return;
      }
      throw new Error("5 calls in a row were all admitted");
    },
  ],
  [
    "a 300 ms deadline against a 2 s upstream delay ends DEADLINE_EXCEEDED",
    async () => {
      const action = "DescribeVideoGenerationTask";
      await admin("POST", "/_emulator/faults", JSON.stringify({ kind: "latency", action, delay: 2 }));
      try {
        // A task nobody asked about: the facade has no cached answer to give instead of waiting for TIW.
        const request = { sdkAppId: SEED_SDK_APP_ID, taskId: `deadline-node-${randomUUID()}` };
        const status = await failure(call(tiw.describeVideoGenerationTask, tiw, request, 300), Code.DEADLINE_EXCEEDED);
        // The facade answers just before the deadline (ErrorInfo UPSTREAM_TIMEOUT); on a slow machine
        // the client's own deadline may fire first, which is DEADLINE_EXCEEDED without details.
        const info = status.details.find((d) => d.typeUrl.endsWith("/google.rpc.ErrorInfo"));
        if (info) console.log(`      ErrorInfo reason ${ErrorInfo.decode(info.value).reason}`);
      } finally {
        await admin("DELETE", `/_emulator/faults?action=${action}`);
      }
    },
  ],
  [
    "WatchSnapshotTask: Running, then Finished, then the stream ends OK",
    async () => {
      const taskId = `watch-node-${randomUUID()}`;
      const task = { Kind: "snapshot", TaskId: taskId, SdkAppId: SEED_SDK_APP_ID, RunSeconds: WATCH_RUN_SECONDS };
      await admin("POST", "/_emulator/tasks", JSON.stringify(task));
      // The stream sends the current answer at once and then each change, as the DescribeSnapshotTask
      // responses themselves, and ends OK after Finished. On UNAVAILABLE (the replica stopped) a
      // caller watches again: the new stream starts with the current state. A watch lasts as long as
      // its task, not as long as a call: a deadline of its own.
      const stream = watcher.watchSnapshotTask({ request: { taskId, sdkAppId: SEED_SDK_APP_ID } }, metadata(), within(60_000));
      const seen: string[] = [];
      // Ends when the stream ends OK; any other end throws the ServiceError (code, details, metadata).
      for await (const answer of stream as AsyncIterable<DescribeSnapshotTaskResponse>) {
        seen.push(answer.status ?? "");
      }
      expect(seen.length >= 2 && seen[0] === "Running" && seen.at(-1) === "Finished", `want Running first and Finished last, saw ${seen}`);
      console.log(`      saw ${seen}`);
    },
  ],
];

async function main(): Promise<number> {
  const chosen = checks.filter(([name]) => name.includes(args.only));
  for (const [name, check] of chosen) {
    try {
      await check();
    } catch (error) {
      console.error(`FAIL ${name}: ${error instanceof Error ? error.message : error}`);
      return 1;
    }
    console.log(`ok   ${name}`);
  }
  console.log(`node client: ${chosen.length} checks passed`);
  return 0;
}

main().then((code) => {
  for (const client of [tiw, watcher, limited, health]) client.close();
  process.exit(code);
});
