using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Vmsnap.Live.Qmp;

/// <summary>A QMP event as QEMU sent it, with QEMU's own timestamp (its wall clock when the event happened).</summary>
/// <param name="Sequence">Order of arrival on this connection, from 0.</param>
/// <param name="Name">The event's name (<c>STOP</c>, <c>RESUME</c>, ...).</param>
/// <param name="Timestamp">QEMU's timestamp.</param>
/// <param name="Data">The event's data, if any.</param>
internal sealed record QmpEvent(long Sequence, string Name, DateTimeOffset Timestamp, JsonObject? Data);

/// <summary>
/// A client of QEMU's machine protocol (QMP) on a Unix socket: capabilities negotiated on connect,
/// one command at a time (replies matched by id), events kept in arrival order with QEMU's
/// timestamps, a time limit on every command, and clear errors when QEMU refuses a command or goes
/// away. Safe for use from several threads (commands are serialized).
/// </summary>
internal sealed class QmpClient : IQmpConnection, IDisposable
{
    /// <summary>How long a command may take unless the caller says otherwise.</summary>
    internal static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(30);

    private readonly Socket _socket;
    private readonly StreamReader _in;
    private readonly object _sendLock = new();
    private readonly object _stateLock = new();
    private readonly Dictionary<string, (string Command, TaskCompletionSource<JsonObject> Reply)> _pending = [];
    private readonly QmpEventLog _events = new();
    private readonly Thread _reader;
    private long _nextId;
    private string? _closedBecause;
    private bool _disposed;

    private QmpClient(string path, Socket socket)
    {
        Path = path;
        _socket = socket;
        _in = new StreamReader(new NetworkStream(socket, ownsSocket: false), new UTF8Encoding(false), false, 1 << 16);
        PeerProcessId = UnixSocket.PeerProcessId(socket);
        _reader = new Thread(ReadLoop) { IsBackground = true, Name = "vmsnap QMP reader" };
    }

    /// <summary>The socket's path.</summary>
    internal string Path { get; }

    /// <summary>QEMU's version from the greeting (major, minor, micro).</summary>
    internal Version QemuVersion { get; private set; } = new(0, 0, 0);

    /// <summary>The QEMU process at the other end, when the kernel says (SO_PEERCRED).</summary>
    internal int? PeerProcessId { get; }

    /// <summary>True once the connection is gone (QEMU exited or closed it).</summary>
    internal bool IsClosed
    {
        get
        {
            lock (_stateLock) return _closedBecause is not null;
        }
    }

    /// <summary>
    /// Connects to the QMP socket at <paramref name="path"/>, reads the greeting and negotiates
    /// capabilities. Fails with a <see cref="QmpException"/> that says how to fix it.
    /// </summary>
    internal static QmpClient Connect(string path, TimeSpan? timeout = null, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        TimeSpan limit = timeout ?? DefaultTimeout;
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e)
        {
            socket.Dispose();
            throw new QmpException(
                $"cannot connect to the QMP socket '{path}': {e.Message}; start QEMU with -qmp unix:{path},server=on,wait=off", null, e);
        }
        var client = new QmpClient(path, socket);
        try
        {
            client.Handshake(limit, cancellationToken);
            return client;
        }
        catch
        {
            client.Dispose();
            throw;
        }
    }

    private void Handshake(TimeSpan limit, CancellationToken cancellationToken)
    {
        // The greeting is read here, before the reader thread starts: a socket whose QMP monitor serves
        // another client accepts the connection but says nothing until that client leaves.
        _socket.ReceiveTimeout = (int)Math.Min(limit.TotalMilliseconds, int.MaxValue);
        string? line;
        try
        {
            using var registration = cancellationToken.Register(() => Shut());
            line = _in.ReadLine();
        }
        catch (IOException e) when (!cancellationToken.IsCancellationRequested)
        {
            throw new QmpException(
                $"no QMP greeting on '{Path}' within {limit.TotalSeconds:0} s: is another client connected? QEMU's QMP socket serves one " +
                "client at a time; give QEMU a second -qmp socket for vmsnap", null, e);
        }
        cancellationToken.ThrowIfCancellationRequested();
        if (line is null) throw new QmpException($"'{Path}' closed the connection before sending a QMP greeting");
        JsonObject greeting = ParseObject(line) ?? throw new QmpException($"'{Path}' is not a QMP socket: it sent '{Abbreviate(line)}'");
        JsonNode? version = greeting["QMP"]?["version"]?["qemu"];
        if (version is null) throw new QmpException($"'{Path}' is not a QMP socket: its greeting has no QEMU version ('{Abbreviate(line)}')");
        QemuVersion = new Version(Int(version["major"]), Int(version["minor"]), Int(version["micro"]));
        _socket.ReceiveTimeout = 0;
        _reader.Start();
        Execute("qmp_capabilities", timeout: limit);
    }

    private static int Int(JsonNode? n) => n is JsonValue v && v.TryGetValue(out int i) ? i : 0;

    /// <summary>True when QEMU is at least <paramref name="major"/>.<paramref name="minor"/>.</summary>
    internal bool IsAtLeast(int major, int minor) => QemuVersion >= new Version(major, minor);

    /// <summary>
    /// Runs a command and returns its "return" value. <paramref name="fd"/>, when given, travels with
    /// the command (for <c>getfd</c>).
    /// </summary>
    /// <exception cref="QmpException">QEMU refused the command, did not answer in time, or the connection is gone.</exception>
    internal JsonNode? Execute(string command, JsonObject? arguments = null, TimeSpan? timeout = null, int fd = -1)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        string id = "vmsnap-" + Interlocked.Increment(ref _nextId).ToString(CultureInfo.InvariantCulture);
        var message = new JsonObject { ["execute"] = command, ["id"] = id };
        if (arguments is not null) message["arguments"] = arguments;
        byte[] bytes = Encoding.UTF8.GetBytes(message.ToJsonString() + "\n");
        var reply = new TaskCompletionSource<JsonObject>(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_stateLock)
        {
            if (_closedBecause is { } why) throw Closed(command, why);
            _pending.Add(id, (command, reply));
        }
        try
        {
            lock (_sendLock) UnixSocket.Send(_socket, bytes, fd, $"QMP command '{command}'");
        }
        catch (IOException e)
        {
            Forget(id);
            // A send that fails means the connection is gone, whether or not the reader has seen its end yet.
            lock (_stateLock) _closedBecause ??= $"sending failed ({e.Message})";
            throw new QmpException($"QMP command '{command}' could not be sent to '{Path}': {e.Message} (did QEMU exit?)", null, e);
        }
        TimeSpan limit = timeout ?? DefaultTimeout;
        bool answered;
        try
        {
            answered = reply.Task.Wait(limit);
        }
        catch (AggregateException e) when (e.InnerException is QmpException closed)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(closed).Throw();
            throw;
        }
        if (!answered)
        {
            Forget(id);
            throw new QmpException($"QEMU did not answer QMP command '{command}' within {limit.TotalSeconds:0} s");
        }
        JsonObject answer = reply.Task.Result;
        if (answer["error"] is JsonObject error)
        {
            string? errorClass = error["class"]?.GetValue<string>();
            string desc = error["desc"]?.GetValue<string>() ?? error.ToJsonString();
            throw new QmpException($"QEMU refused '{command}': {desc}", errorClass);
        }
        return answer["return"];
    }

    private void Forget(string id)
    {
        lock (_stateLock) _pending.Remove(id);
    }

    /// <summary>Sequence number the next event will get: pass it to <see cref="EventsSince"/> to see what came after.</summary>
    internal long EventMark => _events.Mark;

    /// <summary>The events kept that arrived at or after <paramref name="mark"/>, oldest first.</summary>
    internal IReadOnlyList<QmpEvent> EventsSince(long mark) => _events.Since(mark);

    /// <summary>
    /// Waits until an event named <paramref name="name"/> arrived at or after <paramref name="mark"/>;
    /// null when <paramref name="timeout"/> passed or the connection closed first.
    /// </summary>
    internal QmpEvent? WaitForEvent(string name, long mark, TimeSpan timeout, CancellationToken cancellationToken = default) =>
        _events.WaitFor(name, mark, timeout, cancellationToken);

    private void ReadLoop()
    {
        string why = "QEMU closed its QMP connection";
        try
        {
            while (true)
            {
                string? line = _in.ReadLine();
                if (line is null) break;
                JsonObject? message = ParseObject(line);
                if (message is null) continue;
                if (message["event"] is JsonValue name)
                {
                    AddEvent(name.GetValue<string>(), message);
                    continue;
                }
                string? id = message["id"] is JsonValue v && v.TryGetValue(out string? s) ? s : null;
                (string, TaskCompletionSource<JsonObject> Reply) waiter = default;
                lock (_stateLock)
                {
                    if (id is not null) _pending.Remove(id, out waiter);
                }
                waiter.Reply?.TrySetResult(message);
            }
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException)
        {
            why = $"the QMP connection failed ({e.Message})";
        }
        lock (_stateLock)
        {
            _closedBecause ??= why;
            foreach ((string command, TaskCompletionSource<JsonObject> reply) in _pending.Values) reply.TrySetException(Closed(command, _closedBecause));
            _pending.Clear();
        }
        _events.Close();
    }

    private void AddEvent(string name, JsonObject message)
    {
        DateTimeOffset at = DateTimeOffset.UtcNow;
        if (message["timestamp"] is JsonObject ts
            && ts["seconds"] is JsonValue sec && sec.TryGetValue(out long seconds)
            && ts["microseconds"] is JsonValue usec && usec.TryGetValue(out long micros))
            at = DateTimeOffset.FromUnixTimeSeconds(seconds).AddTicks(micros * 10);
        _events.Add(name, at, message["data"] as JsonObject);
    }

    private QmpException Closed(string command, string why) =>
        new($"QMP command '{command}' on '{Path}' failed: {why} (did QEMU exit?)");

    private static JsonObject? ParseObject(string line)
    {
        try
        {
            return JsonNode.Parse(line) as JsonObject;
        }
        catch (JsonException)
        {
            return null;
        }
    }

    private static string Abbreviate(string s) => s.Length <= 80 ? s : s[..80] + "...";

    private void Shut()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    // The interface's view of the members above (they stay internal, as the class's own callers use them).
    string IQmpConnection.Path => Path;
    bool IQmpConnection.IsClosed => IsClosed;
    int? IQmpConnection.PeerProcessId => PeerProcessId;
    bool IQmpConnection.IsAtLeast(int major, int minor) => IsAtLeast(major, minor);
    JsonNode? IQmpConnection.Execute(string command, JsonObject? arguments, TimeSpan? timeout, int fd) => Execute(command, arguments, timeout, fd);
    long IQmpConnection.EventMark => EventMark;
    IReadOnlyList<QmpEvent> IQmpConnection.EventsSince(long mark) => EventsSince(mark);
    QmpEvent? IQmpConnection.WaitForEvent(string name, long mark, TimeSpan timeout, CancellationToken cancellationToken) => WaitForEvent(name, mark, timeout, cancellationToken);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Shut();
        if (_reader.IsAlive) _reader.Join(TimeSpan.FromSeconds(5));
        _socket.Dispose();
        _in.Dispose();
    }
}
