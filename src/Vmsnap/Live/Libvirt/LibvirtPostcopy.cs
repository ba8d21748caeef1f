using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Xml.Linq;
using Vmsnap.Migration;
using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;
using static Vmsnap.Live.Libvirt.LibvirtNative;

namespace Vmsnap.Live.Libvirt;

/// <summary>
/// <c>loadvm --domain --postcopy</c>: vmsnap is the source half of libvirt's own migration protocol (version 3, with
/// parameters), and libvirt the destination, as in a migration between two hosts. Prepare starts the domain's QEMU waiting
/// for an incoming migration with <c>postcopy-ram</c> set, at a TCP address on 127.0.0.1; vmsnap connects and sends the
/// snapshot as a postcopy source (the device state first, then every page, those the guest touches first), calling Finish
/// meanwhile. libvirt runs the guest as soon as the device state is in (it reports the domain running within tens of ms,
/// measured on 9.0 and 11.3), and its Finish returns once QEMU has every page.
/// </summary>
/// <remarks>
/// Prepare3Params and Finish3Params are exported by libvirt.so.0 for the source libvirt's use; their remote protocol is
/// stable, as migration between libvirt releases needs. The cookie says who the source is: the domain's name and UUID, a
/// host name, and a host UUID of its own (libvirt refuses a migration from its own host UUID). Nothing is tainted.
/// </remarks>
internal sealed class LibvirtPostcopy(LibvirtDomain domain, string tag, IProgress<long>? progress, TimeSpan loadTimeout)
{
    /// <summary>Socket send buffer while pages are served: small, so a requested page waits little behind streamed ones.</summary>
    private const int SendBufferBytes = 256 << 10;
    private const int ReadBufferBytes = 4 << 20;

    /// <summary>How a postcopy revert went; seconds from the start of the load. <paramref name="SecondsToRunning"/>: until libvirt saw the guest run.</summary>
    internal sealed record Outcome(double? SecondsToRunning, double SecondsToLastPage, PostcopySourceResult Sent);

    /// <summary>The snapshot's page index, and how it was had.</summary>
    internal sealed record Index(PostcopyIndex Pages, bool Recorded, string? Problem, double Seconds)
    {
        internal static Index Of(string vmImage, Qcow2Snapshot vmSnapshot, string tag, CancellationToken cancellation)
        {
            var clock = Stopwatch.StartNew();
            PostcopyIndex pages = LiveLoad.IndexForPostcopy(vmImage, vmSnapshot, tag, cancellation, out bool recorded, out string? problem);
            return new Index(pages, recorded, problem, clock.Elapsed.TotalSeconds);
        }
    }

    /// <summary>
    /// Postcopy failed before the guest started: libvirt stopped the QEMU it had started, the domain is shut off as before,
    /// and the caller may restore it another way.
    /// </summary>
    internal sealed class NotStartedException(string message, Exception? inner = null) : Exception(message, inner);

    /// <param name="domainXml">The snapshot's domain definition, the one libvirt starts.</param>
    /// <param name="vmImage">The image whose snapshot holds the VM state.</param>
    /// <param name="vmSnapshot">That snapshot.</param>
    /// <param name="indexing">The snapshot's page index, being made meanwhile; awaited once libvirt's QEMU waits.</param>
    /// <param name="clock">The load's clock.</param>
    internal Outcome Run(XElement domainXml, string vmImage, Qcow2Snapshot vmSnapshot, Task<Index> indexing, Stopwatch clock)
    {
        string uuid = domainXml.Element("uuid")?.Value
            ?? throw new NotStartedException($"the domain definition of snapshot '{tag}' has no UUID");
        string cookie = new XElement("qemu-migration",
            new XElement("name", domain.Name), new XElement("uuid", uuid),
            new XElement("hostname", "vmsnap"), new XElement("hostuuid", Guid.NewGuid().ToString())).ToString(SaveOptions.DisableFormatting);
        const uint flags = MigrateLive | MigratePostcopy;

        // Two opens, as for loadvm --postcopy: single pages read at their place (what the guest asks for), the stream read in order.
        using Qcow2Image pages = Qcow2Image.Open(vmImage, new Qcow2OpenOptions { ForceShare = true });
        Qcow2Snapshot current = pages.FindSnapshot(vmSnapshot.Id) ?? throw new NotStartedException($"snapshot '{tag}' of {vmImage} is gone");
        using Qcow2VmStateArea pageArea = pages.OpenVmStateAreaForReading(current);
        using LiveSession.SnapshotStream stream = LiveSession.OpenSnapshotStream(vmImage, current, $"snapshot '{tag}' of {vmImage} is gone", area => new LiveLoad.ServedReads(area));

        int port = Prepare(domainXml.ToString(SaveOptions.DisableFormatting), cookie, flags);
        LiveTrace.Mark("libvirt prepared the incoming migration");
        PostcopyIndex index;
        try
        {
            index = indexing.GetAwaiter().GetResult().Pages;
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            Finish(cookie, flags, cancelled: true);
            throw new NotStartedException(e.Message, e);
        }
        Socket socket;
        try
        {
            socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true, SendBufferSize = SendBufferBytes };
            socket.Connect(new IPEndPoint(IPAddress.Loopback, port));
        }
        catch (SocketException e)
        {
            Finish(cookie, flags, cancelled: true);
            throw new NotStartedException($"connecting to the QEMU libvirt started for the migration (127.0.0.1:{port}) failed: {e.Message}", e);
        }
        using var _ = socket;
        LiveTrace.Mark("connected");

        PostcopySource? served = null;
        var source = new PostcopySource(index, new LiveLoad.ServedReads(pageArea), socket, new LiveLoad.PagesAsBytes(progress, () => served?.GuestStartConfirmed == true))
        {
            GuestStarted = () => LiveTrace.Mark("guest started"),
        };
        served = source;
        try
        {
            source.SendDeviceState();
        }
        catch (Exception e) when (e is VmsnapException or IOException or SocketException)
        {
            socket.Dispose();
            Finish(cookie, flags, cancelled: true);
            throw new NotStartedException($"sending the device state to QEMU failed: {e.Message}", e);
        }
        LiveTrace.Mark("device state sent");

        // When the guest runs, as libvirt sees it (its Finish returns only once every page is in, on libvirt 9.0 and 11.3 alike).
        double? running = null;
        using var stopWatching = new ManualResetEventSlim();
        var watcher = new Thread(() =>
        {
            try
            {
                while (running is null && !stopWatching.IsSet)
                {
                    if (domain.State == DomainRunning)
                    {
                        running = clock.Elapsed.TotalSeconds;
                        LiveTrace.Mark("domain running");
                    }
                    else stopWatching.Wait(5);
                }
            }
            catch (LiveSnapshotException)
            {
                // libvirt gone: the load goes on without knowing when the guest ran.
            }
        }) { IsBackground = true, Name = "vmsnap libvirt domain state" };
        watcher.Start();
        try
        {
            return Serve(source, stream, current, cookie, flags, socket, clock, () => running);
        }
        finally
        {
            stopWatching.Set();
            watcher.Join();
        }
    }

    private Outcome Serve(PostcopySource source, LiveSession.SnapshotStream stream, Qcow2Snapshot current, string cookie, uint flags, Socket socket, Stopwatch clock,
        Func<double?> running)
    {
        // libvirt's Finish waits until QEMU is in postcopy and has every page, the guest running meanwhile.
        string? finishFailure = null;
        var finisher = new Thread(() =>
        {
            finishFailure = Finish(cookie, flags, cancelled: false);
            LiveTrace.Mark(finishFailure is null ? "libvirt finished the migration" : "libvirt's finish failed");
            // Before the guest started, a failed finish ends the load (libvirt stops that QEMU); after, the guest needs every page whatever
            // libvirt says (libvirtd gone, say: QEMU runs on), so the pages go on.
            if (finishFailure is not null && !source.GuestStartConfirmed)
            {
                try { socket.Shutdown(SocketShutdown.Both); }
                catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
            }
        }) { IsBackground = true, Name = "vmsnap libvirt migration finish" };
        finisher.Start();

        PostcopySourceResult sent;
        double lastPage;
        try
        {
            using VmStateReader reader = stream.NewReader(ReadBufferBytes);
            sent = source.SendPages(reader, current.VmStateSize);
            lastPage = clock.Elapsed.TotalSeconds;
            LiveTrace.Mark("last page sent");
        }
        catch (Exception e) when (e is VmsnapException or IOException or SocketException)
        {
            socket.Dispose();
            finisher.Join();
            string why = finishFailure ?? source.ReturnPathProblem ?? e.Message;
            if (!source.GuestStartConfirmed)
                throw new NotStartedException($"the postcopy load failed before the guest started: {why}", e);
            throw new LiveSnapshotException($"serving snapshot '{tag}' to domain '{domain.Name}' failed after its guest started: {why}; the guest stalls on its " +
                $"missing pages (libvirt: running, post-copy failed): stop it (virsh destroy {domain.Name}) and load the snapshot again", e);
        }
        string? shut = source.WaitForShut(loadTimeout);
        finisher.Join();
        if (finishFailure is not null)
        {
            if (!source.GuestStartConfirmed) throw new NotStartedException($"libvirt did not finish the incoming migration: {finishFailure}");
            throw new LiveSnapshotException($"libvirt did not finish the incoming migration of domain '{domain.Name}': {finishFailure}; every page was sent " +
                (shut is null ? "and QEMU has them all: the guest runs from snapshot '" + tag + "'" : $"(QEMU did not confirm them: {shut})") +
                $"; libvirt's current snapshot is not set to it (virsh snapshot-current {domain.Name} {tag} sets it once libvirt is back)");
        }
        if (shut is not null)
            throw new LiveSnapshotException($"QEMU did not confirm the postcopy load of domain '{domain.Name}': {shut}");
        return new Outcome(running(), lastPage, sent);
    }

    /// <summary>Has libvirt start the domain's QEMU for an incoming migration on 127.0.0.1; returns the port QEMU listens on.</summary>
    private unsafe int Prepare(string xml, string cookie, uint flags)
    {
        using var parameters = new StringParameters(("destination_xml", xml), ("migrate_uri", "tcp://127.0.0.1"));
        byte[] cookieBytes = Encoding.UTF8.GetBytes(cookie + "\0");
        int rc;
        nint cookieOut, uriOut;
        fixed (byte* c = cookieBytes)
            rc = virDomainMigratePrepare3Params(domain.Connection, parameters.Pointer, parameters.Count, c, cookieBytes.Length, out cookieOut, out _, out uriOut, flags);
        string? why = rc == 0 ? null : LastError();
        if (cookieOut != 0) free(cookieOut);
        string? uri = TakeString(uriOut);
        if (rc != 0)
            throw new NotStartedException($"libvirt refused the incoming migration: {why}");
        int colon = uri?.LastIndexOf(':') ?? -1;
        if (uri is null || colon < 0 || !int.TryParse(uri.AsSpan(colon + 1), out int port))
        {
            Finish(cookie, flags, cancelled: true);
            throw new NotStartedException($"libvirt gave no port for the incoming migration (URI '{uri}')");
        }
        return port;
    }

    /// <summary>libvirt's Finish: the domain runs, or (<paramref name="cancelled"/>) its QEMU is stopped. Returns libvirt's error, or null.</summary>
    private unsafe string? Finish(string cookie, uint flags, bool cancelled)
    {
        using var parameters = new StringParameters(("destination_name", domain.Name));
        byte[] cookieBytes = Encoding.UTF8.GetBytes(cookie + "\0");
        nint result, cookieOut;
        fixed (byte* c = cookieBytes)
            result = virDomainMigrateFinish3Params(domain.Connection, parameters.Pointer, parameters.Count, c, cookieBytes.Length, out cookieOut, out _, flags, cancelled ? 1 : 0);
        string? why = result == 0 && !cancelled ? LastError() : null;
        if (cookieOut != 0) free(cookieOut);
        if (result != 0) virDomainFree(result);
        return why;
    }

    /// <summary>String-valued typed parameters in unmanaged memory, freed on dispose.</summary>
    private sealed unsafe class StringParameters : IDisposable
    {
        private readonly TypedParameter* _parameters;
        private readonly nint[] _strings;

        internal StringParameters(params (string Name, string Value)[] values)
        {
            Count = values.Length;
            _parameters = (TypedParameter*)NativeMemory.AllocZeroed((nuint)(values.Length * sizeof(TypedParameter)));
            _strings = new nint[values.Length];
            for (int i = 0; i < values.Length; i++)
            {
                byte[] name = Encoding.ASCII.GetBytes(values[i].Name);
                for (int b = 0; b < name.Length && b < 79; b++) _parameters[i].Field[b] = name[b];
                _parameters[i].Type = TypedParamString;
                _strings[i] = Marshal.StringToCoTaskMemUTF8(values[i].Value);
                _parameters[i].Value = _strings[i];
            }
        }

        internal int Count { get; }

        internal TypedParameter* Pointer => _parameters;

        public void Dispose()
        {
            foreach (nint s in _strings) Marshal.FreeCoTaskMem(s);
            NativeMemory.Free(_parameters);
        }
    }
}
