using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// A real <c>qemu-system-x86_64</c> driven over QMP for interop tests: start with given arguments (plus
/// <c>-qmp unix:SOCK,server=on,wait=off -nodefaults -display none</c>), run commands, migrate to or from a
/// file, quit. The process is always killed on dispose and on timeout; its stderr is kept for failure
/// messages.
/// </summary>
internal sealed class QemuVm : IDisposable
{
    private static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(120);

    private readonly Process _process;
    private readonly string _socketDir;
    private readonly StringBuilder _stderr = new();
    private readonly StringBuilder _stdout = new();
    private readonly string _commandLine;
    private Socket? _socket;
    private StreamReader? _qmpIn;
    private Stream? _qmpOut;
    private long _nextId;

    private QemuVm(Process process, string socketDir, string commandLine)
    {
        _process = process;
        _socketDir = socketDir;
        _commandLine = commandLine;
    }

    /// <summary>What QEMU wrote on stderr (and stdout) so far.</summary>
    public string Output
    {
        get
        {
            lock (_stderr) lock (_stdout) return (_stderr.ToString() + _stdout).Trim();
        }
    }

    public bool HasExited => _process.HasExited;

    /// <summary>Starts QEMU and connects QMP (capabilities negotiated). <paramref name="paused"/> adds <c>-S</c>.</summary>
    public static QemuVm Start(IEnumerable<string> args, bool paused = false, TimeSpan? timeout = null)
    {
        string qemu = Tool.Find("qemu-system-x86_64");
        // Unix socket paths are limited to ~108 bytes: keep the folder short.
        string socketDir = Path.Combine("/tmp", "vmsnap-qmp-" + Guid.NewGuid().ToString("N")[..10]);
        Directory.CreateDirectory(socketDir);
        string socket = Path.Combine(socketDir, "qmp.sock");

        var psi = new ProcessStartInfo(qemu)
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (string a in args) psi.ArgumentList.Add(a);
        foreach (string a in new[] { "-qmp", $"unix:{socket},server=on,wait=off", "-nodefaults", "-display", "none" })
            psi.ArgumentList.Add(a);
        if (paused) psi.ArgumentList.Add("-S");
        string commandLine = "qemu-system-x86_64 " + string.Join(' ', psi.ArgumentList);

        var process = new Process { StartInfo = psi };
        var vm = new QemuVm(process, socketDir, commandLine);
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (vm._stderr) vm._stderr.AppendLine(e.Data); };
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (vm._stdout) vm._stdout.AppendLine(e.Data); };
        try
        {
            Tool.Start(process);
            process.BeginErrorReadLine();
            process.BeginOutputReadLine();
            process.StandardInput.Close();
            vm.Connect(socket, timeout ?? DefaultTimeout);
            vm.Execute("qmp_capabilities");
            return vm;
        }
        catch
        {
            vm.Dispose();
            throw;
        }
    }

    private void Connect(string socketPath, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            if (_process.HasExited) throw Failure($"QEMU exited with code {_process.ExitCode} before its QMP socket was ready");
            if (File.Exists(socketPath))
            {
                var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    s.Connect(new UnixDomainSocketEndPoint(socketPath));
                    s.ReceiveTimeout = (int)DefaultTimeout.TotalMilliseconds;
                    _socket = s;
                    var stream = new NetworkStream(s, ownsSocket: false);
                    _qmpIn = new StreamReader(stream, Encoding.UTF8);
                    _qmpOut = stream;
                    ReadMessage(); // the greeting
                    return;
                }
                catch (Exception e) when (e is SocketException or IOException)
                {
                    // QEMU may exit (e.g. a refused -incoming stream) while we connect: the loop then reports its exit.
                    s.Dispose();
                    _socket = null;
                    Thread.Sleep(50);
                }
            }
            if (clock.Elapsed > timeout) throw Failure("QEMU's QMP socket did not come up in time");
            Thread.Sleep(20);
        }
    }

    /// <summary>Runs a QMP command and returns its "return" value; a QMP error fails with QEMU's text and stderr.</summary>
    public JsonNode? Execute(string command, object? arguments = null)
    {
        var message = new JsonObject { ["execute"] = command };
        if (arguments is not null) message["arguments"] = JsonSerializer.SerializeToNode(arguments);
        return ExecuteJson(message.ToJsonString());
    }

    /// <summary>Sends one QMP message given as JSON text (e.g. <c>{"execute": "query-status"}</c>) and returns its "return" value.</summary>
    public JsonNode? ExecuteJson(string json)
    {
        JsonObject message = JsonNode.Parse(json)!.AsObject();
        string command = message["execute"]?.GetValue<string>() ?? json;
        // Every command carries its own id, and only the reply with that id answers it: events, the
        // greeting and any reply left over from an earlier command are skipped, never taken for this reply.
        string id = "vmsnap-test-" + Interlocked.Increment(ref _nextId);
        message["id"] = id;
        byte[] bytes = Encoding.UTF8.GetBytes(message.ToJsonString() + "\n");
        try
        {
            _qmpOut!.Write(bytes);
            _qmpOut.Flush();
            while (true)
            {
                JsonObject reply = ReadMessage();
                if (reply["id"] is not JsonValue replyId || replyId.GetValueKind() != JsonValueKind.String
                    || replyId.GetValue<string>() != id) continue;
                if (reply["error"] is JsonNode error)
                    throw Failure($"QMP {command} failed: {error["desc"]}");
                return reply["return"];
            }
        }
        catch (IOException e)
        {
            _process.WaitForExit(5000); // let QEMU finish saying why it went away
            throw Failure($"QMP {command}: connection lost ({e.Message})");
        }
    }

    private JsonObject ReadMessage()
    {
        string? line = _qmpIn!.ReadLine();
        if (line is null)
        {
            _process.WaitForExit(5000);
            throw Failure("QMP connection closed" + (_process.HasExited ? $" (QEMU exited with code {_process.ExitCode})" : ""));
        }
        return JsonNode.Parse(line)!.AsObject();
    }

    /// <summary>Runs a human monitor command (savevm, loadvm, info snapshots) and returns its output.</summary>
    public string Hmp(string commandLine) =>
        Execute("human-monitor-command", new Dictionary<string, string> { ["command-line"] = commandLine })?.GetValue<string>() ?? "";

    /// <summary>Migrates out (e.g. <c>exec:cat &gt; FILE</c>) and waits until QEMU says completed; failed or a timeout fails the test.</summary>
    public void Migrate(string uri, TimeSpan? timeout = null)
    {
        Execute("migrate", new Dictionary<string, string> { ["uri"] = uri });
        var clock = Stopwatch.StartNew();
        while (true)
        {
            JsonNode? info = Execute("query-migrate");
            string? status = info?["status"]?.GetValue<string>();
            if (status == "completed") return;
            if (status is "failed" or "cancelled")
                throw Failure($"migration to {uri} {status}: {info?["error-desc"]}");
            if (clock.Elapsed > (timeout ?? DefaultTimeout)) throw Failure($"migration to {uri} did not complete in time (status {status})");
            Thread.Sleep(50);
        }
    }

    /// <summary>
    /// Migrates into <paramref name="path"/> through <c>exec:cat</c> and returns once the file is complete:
    /// the stream goes to a side file that is renamed when <c>cat</c> has written everything, because
    /// QEMU may report completion before its child process finished writing.
    /// </summary>
    public void MigrateToFile(string path, TimeSpan? timeout = null)
    {
        string part = path + ".part";
        Migrate($"exec:cat > {part} && mv {part} {path}", timeout);
        var clock = Stopwatch.StartNew();
        while (!File.Exists(path))
        {
            if (clock.Elapsed > (timeout ?? DefaultTimeout)) throw Failure($"the migration stream {path} did not appear in time");
            Thread.Sleep(20);
        }
    }

    /// <summary>
    /// Waits until an incoming migration (<c>-incoming "exec:cat FILE"</c>) has completed: the run state
    /// leaves "inmigrate" and no migration failure is reported. QEMU exits when loading fails; that fails
    /// the test with its error text. Returns the run state reached (e.g. "paused", "running", "prelaunch").
    /// </summary>
    public string WaitIncomingCompleted(TimeSpan? timeout = null)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            if (_process.HasExited) throw Failure($"QEMU exited with code {_process.ExitCode} while loading the incoming stream");
            string? status;
            try
            {
                status = Execute("query-status")?["status"]?.GetValue<string>();
            }
            catch (QemuException) when (_process.WaitForExit(5000))
            {
                throw Failure($"QEMU exited with code {_process.ExitCode} while loading the incoming stream");
            }
            if (status is not null && status != "inmigrate")
            {
                JsonNode? info = Execute("query-migrate");
                string? migration = info?["status"]?.GetValue<string>();
                if (migration is "failed" or "cancelled")
                    throw Failure($"incoming migration {migration}: {info?["error-desc"]} (run state {status})");
                if (status is "shutdown" or "internal-error" or "guest-panicked")
                    throw Failure($"QEMU reached run state {status} after the incoming migration");
                return status;
            }
            if (clock.Elapsed > (timeout ?? DefaultTimeout)) throw Failure($"incoming migration did not complete in time (run state {status})");
            Thread.Sleep(50);
        }
    }

    /// <summary>Asks QEMU to quit and waits for it to exit (killing it if it does not).</summary>
    public void Quit(TimeSpan? timeout = null)
    {
        if (_process.HasExited) return;
        try { Execute("quit"); } catch (QemuException) { }
        if (!_process.WaitForExit((int)(timeout ?? TimeSpan.FromSeconds(30)).TotalMilliseconds))
        {
            Kill();
            throw Failure("QEMU did not quit in time");
        }
        _process.WaitForExit();
    }

    private void Kill()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.Kill(entireProcessTree: true);
                _process.WaitForExit(10000);
            }
        }
        catch (InvalidOperationException) { }
    }

    public void Dispose()
    {
        Kill();
        _qmpIn?.Dispose();
        _socket?.Dispose();
        _process.Dispose();
        try { Directory.Delete(_socketDir, recursive: true); } catch (IOException) { }
    }

    private QemuException Failure(string what)
    {
        if (_process.HasExited) _process.WaitForExit();
        return new QemuException($"{what}\ncommand: {_commandLine}\nQEMU output:\n{Output}");
    }

    /// <summary>
    /// Starts a paused guest with <paramref name="args"/>, migrates it into <paramref name="streamPath"/>
    /// and quits: the way to make a QEMU stream (or a template) whose RAM the test knows.
    /// </summary>
    public static void SaveStream(IEnumerable<string> args, string streamPath)
    {
        using var vm = Start(args, paused: true);
        vm.MigrateToFile(streamPath);
        vm.Quit();
    }

    /// <summary>
    /// Starts a guest with <paramref name="args"/> that loads <paramref name="streamPath"/> (<c>-incoming
    /// "exec:cat FILE"</c>, paused), waits until the load completed and quits; returns the run state reached.
    /// A stream QEMU refuses fails with QEMU's error text.
    /// </summary>
    public static string LoadStream(IEnumerable<string> args, string streamPath)
    {
        using var vm = Start([.. args, .. IncomingFrom(streamPath)], paused: true);
        string state = vm.WaitIncomingCompleted();
        vm.Quit();
        return state;
    }

    /// <summary>Arguments for a device-less guest whose RAM is <paramref name="ramFile"/> (a shared memory-backend-file).</summary>
    public static string[] MachineNone(string ramFile, long ramBytes) =>
    [
        "-machine", "none", "-m", $"{ramBytes >> 20}M",
        "-object", $"memory-backend-file,id=ram0,size={ramBytes},mem-path={ramFile},share=on",
        "-machine", "memory-backend=ram0",
    ];

    /// <summary>
    /// Arguments for a PC (i440fx) guest whose main RAM block <c>ram0</c> is <paramref name="ramFile"/>; start it paused so no
    /// guest code runs. The machine type is the current one of the QEMU in use (<c>pc-i440fx-7.2</c>, <c>pc-i440fx-10.0</c>)
    /// unless <paramref name="machine"/> names another (e.g. <c>pc-q35-10.0</c>).
    /// </summary>
    public static string[] MachinePc(string ramFile, long ramBytes, string? machine = null) =>
    [
        "-machine", machine ?? QemuInstall.Current.PcMachine, "-m", $"{ramBytes >> 20}M",
        "-object", $"memory-backend-file,id=ram0,size={ramBytes},mem-path={ramFile},share=on",
        "-machine", "memory-backend=ram0",
    ];

    /// <summary>Arguments for a guest of <paramref name="machine"/> (<c>none</c>, a PC type) whose RAM block <c>ram0</c> is <paramref name="ramFile"/>.</summary>
    public static string[] Machine(string machine, string ramFile, long ramBytes) =>
        machine == "none" ? MachineNone(ramFile, ramBytes) : MachinePc(ramFile, ramBytes, machine);

    /// <summary>
    /// Migrates into <paramref name="path"/> with QEMU's own <c>file:</c> URI (8.2+; QEMU writes the file itself), with
    /// migration capabilities <paramref name="capabilities"/> on (e.g. mapped-ram, multifd) and parameters set
    /// (e.g. direct-io); returns QEMU's <c>query-migrate</c> RAM figures.
    /// </summary>
    public JsonNode? MigrateToFileUri(string path, string[] capabilities, Dictionary<string, object>? parameters = null, TimeSpan? timeout = null)
    {
        if (capabilities.Length > 0)
            Execute("migrate-set-capabilities", new Dictionary<string, object>
            {
                ["capabilities"] = capabilities.Select(c => new Dictionary<string, object> { ["capability"] = c, ["state"] = true }).ToArray(),
            });
        if (parameters is not null) Execute("migrate-set-parameters", parameters);
        Migrate($"file:{path}", timeout);
        return Execute("query-migrate")?["ram"];
    }

    /// <summary>
    /// Loads <paramref name="path"/> into a QEMU started with <c>-incoming defer</c>: capabilities and parameters set, then
    /// <c>migrate-incoming file:PATH</c>; waits until it completed and returns the run state reached.
    /// </summary>
    public string IncomingFromFileUri(string path, string[] capabilities, Dictionary<string, object>? parameters = null, TimeSpan? timeout = null)
    {
        if (capabilities.Length > 0)
            Execute("migrate-set-capabilities", new Dictionary<string, object>
            {
                ["capabilities"] = capabilities.Select(c => new Dictionary<string, object> { ["capability"] = c, ["state"] = true }).ToArray(),
            });
        if (parameters is not null) Execute("migrate-set-parameters", parameters);
        Execute("migrate-incoming", new Dictionary<string, string> { ["uri"] = $"file:{path}" });
        return WaitIncomingCompleted(timeout);
    }

    /// <summary>The <c>-incoming</c> arguments that load a stream from a file.</summary>
    public static string[] IncomingFrom(string streamFile) => ["-incoming", $"exec:cat {streamFile}"];
}

/// <summary>A QEMU process or QMP command failed; the message has QEMU's own words.</summary>
internal sealed class QemuException(string message) : Exception(message);
