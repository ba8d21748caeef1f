using System.Text;
using Vmsnap.Storage;
using Vmsnap.VmState;
using Vmsnap.Storage.LowLevel;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>
/// What <see cref="MigrationStream.Write"/> needs to make a stream QEMU loads: the machine type, the RAM
/// blocks with where their bytes come from, and the device state that follows the RAM section.
/// </summary>
/// <remarks>
/// Built from options (<see cref="Create"/>: a machine type and RAM files; no device sections) or from a
/// template stream (<see cref="FromTemplate(string, IEnumerable{KeyValuePair{string, string}}, string?, CancellationToken)"/>:
/// its configuration, block list and device state are reused, the blocks given as files replace the
/// template's pages). Dispose it to delete the scratch files a template needs.
/// </remarks>
public sealed class MachineProfile : IDisposable
{
    /// <summary>RAM section id used by <see cref="Create"/>: the number QEMU 10.0 gives it for <c>-machine none</c> (QEMU 7.2: <see cref="Qemu72RamSectionId"/>).</summary>
    internal const uint DefaultRamSectionId = 1;

    /// <summary>QEMU 7.2's RAM section id for <c>-machine none</c>.</summary>
    internal const uint Qemu72RamSectionId = 2;

    private readonly string[] _sources;
    private readonly string? _scratchDirectory;

    private MachineProfile(string? machineType, byte[] configurationSubsections, uint ramSectionId, uint ramInstance,
        IReadOnlyList<RamBlockInfo> blocks, string[] sources, byte[] deviceState, string? scratchDirectory,
        IReadOnlyList<byte[]>? earlySections = null, bool switchoverStart = false)
    {
        EarlySections = earlySections ?? [];
        SwitchoverStart = switchoverStart;
        MachineType = machineType;
        ConfigurationSubsections = configurationSubsections;
        RamSectionId = ramSectionId;
        RamInstance = ramInstance;
        RamBlocks = blocks;
        _sources = sources;
        DeviceState = deviceState;
        _scratchDirectory = scratchDirectory;
    }

    /// <summary>Machine type written in the configuration section (QEMU checks it equals its own), or null for a template without one.</summary>
    public string? MachineType { get; }

    /// <summary>RAM blocks in stream order (the MEM_SIZE list).</summary>
    public IReadOnlyList<RamBlockInfo> RamBlocks { get; }

    /// <summary>The bytes written after the RAM section: device sections, EOF and the VM description.</summary>
    public ReadOnlyMemory<byte> DeviceState { get; }

    internal byte[] ConfigurationSubsections { get; }

    /// <summary>Early-setup device sections (virtio-mem) written right after the RAM section's start, verbatim.</summary>
    internal IReadOnlyList<byte[]> EarlySections { get; }

    /// <summary>Write the SWITCHOVER_START command before the RAM section's end (as QEMU 10.0+ does for machine types 10.0+).</summary>
    internal bool SwitchoverStart { get; }

    internal uint RamSectionId { get; }
    internal uint RamInstance { get; }

    /// <summary>The file holding block <paramref name="index"/>'s bytes (a RAM file given, or a scratch file cut from the template).</summary>
    internal string SourceOf(int index) => _sources[index];

    /// <summary>
    /// A profile from options: machine type <paramref name="machineType"/> and one RAM block per
    /// (id, file) pair, in that order, each as long as its file. The device state is EOF plus an empty
    /// VM description, which QEMU accepts for a machine without devices (<c>-machine none</c>).
    /// </summary>
    /// <remarks>
    /// The stream is what the QEMU it is for writes: the VM description has QEMU 8.2's shape (a configuration
    /// object first) unless <paramref name="qemuVersion"/> is older; a versioned machine type of 10.0 or later
    /// (<c>pc-i440fx-10.0</c>) gets QEMU 10's SWITCHOVER_START command. <c>none</c> and older machine types get
    /// none: QEMU before 10.0 refuses the command and QEMU 10 loads streams without it, so such a stream loads
    /// in QEMU 7.2 and 10.0 alike.
    /// </remarks>
    /// <param name="machineType">The machine type QEMU checks against its own (<c>none</c>, <c>pc-i440fx-7.2</c>).</param>
    /// <param name="ramFiles">RAM block ids and their files.</param>
    /// <param name="qemuVersion">The QEMU the stream is for (null: current, 8.2 or later).</param>
    /// <exception cref="MigrationStreamException">A file is missing, empty or not a multiple of 4096 bytes, or an id is bad or repeated.</exception>
    public static MachineProfile Create(string machineType, IEnumerable<KeyValuePair<string, string>> ramFiles, Version? qemuVersion = null)
    {
        ArgumentNullException.ThrowIfNull(ramFiles);
        CheckMachineType(machineType);
        var blocks = new List<RamBlockInfo>();
        var sources = new List<string>();
        foreach (var (id, path) in ramFiles)
        {
            CheckBlockId(id);
            if (blocks.Any(b => b.Id == id)) throw new MigrationStreamException($"RAM block '{id}' is given more than once");
            long length = RamFileLength(id, path);
            if (length == 0 || length % MigrationFormat.PageSize != 0)
                throw new MigrationStreamException(
                    $"RAM file '{path}' for block '{id}' is {length} bytes; a RAM block is a positive multiple of 4096 bytes");
            blocks.Add(new RamBlockInfo(id, length));
            sources.Add(Path.GetFullPath(path));
        }
        if (blocks.Count == 0) throw new MigrationStreamException("no RAM block given; a stream needs at least one (e.g. ram0=FILE)");

        byte[] json = VmDescription.Empty(machineType, configurationObject: qemuVersion is null || qemuVersion >= new Version(8, 2));
        byte[] tail = new byte[1 + 1 + 4 + json.Length];
        tail[0] = MigrationFormat.Eof;
        tail[1] = MigrationFormat.VmDescription;
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(tail.AsSpan(2), (uint)json.Length);
        json.CopyTo(tail, 6);
        bool switchover = MachineVersion(machineType) is { } v && v >= new Version(10, 0) && (qemuVersion is null || qemuVersion >= new Version(10, 0));
        // Section ids are the stream's own (QEMU matches sections by name); numbered as the QEMU it is for numbers them.
        uint ramId = qemuVersion is null || qemuVersion >= new Version(10, 0) ? DefaultRamSectionId : Qemu72RamSectionId;
        return new MachineProfile(machineType, [], ramId, 0, blocks.ToArray(), sources.ToArray(), tail, null, null, switchover);
    }

    /// <summary>The QEMU version of a versioned machine type (<c>pc-i440fx-10.0</c>, <c>pc-q35-7.2</c>), or null (<c>none</c>, <c>microvm</c>).</summary>
    internal static Version? MachineVersion(string machineType)
    {
        int dash = machineType.LastIndexOf('-');
        return dash > 0 && Version.TryParse(machineType[(dash + 1)..], out Version? v) && v.Build < 0 ? v : null;
    }

    /// <summary>
    /// A profile from a template stream file (e.g. from QEMU's <c>migrate "exec:cat &gt; FILE"</c>, or a mapped-ram
    /// <c>migrate file:</c>): its machine type, block list, early-setup sections, SWITCHOVER_START command and device
    /// state are kept (a plain stream is written either way); each (id, file) pair replaces that block's pages with the
    /// file, which must be exactly the block's length. The pages of the other blocks are copied from the
    /// template into sparse scratch files under <paramref name="scratchDirectory"/> (default: the system's
    /// temporary folder) until the profile is disposed.
    /// </summary>
    /// <exception cref="MigrationStreamException">The template is not a stream vmsnap reads, an id is not one of its blocks, or a file's length differs from its block's.</exception>
    public static MachineProfile FromTemplate(string templatePath, IEnumerable<KeyValuePair<string, string>> ramFiles,
        string? scratchDirectory = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(templatePath);
        using var device = FileBlockDevice.Open(templatePath);
        using var backend = VmStateBackend.ForBlockDevice(device);
        using var reader = new VmStateReader(backend);
        return FromTemplate(reader, ramFiles, scratchDirectory, cancellationToken);
    }

    /// <summary>As <see cref="FromTemplate(string, IEnumerable{KeyValuePair{string, string}}, string?, CancellationToken)"/>, reading the template from <paramref name="template"/> to its end.</summary>
    public static MachineProfile FromTemplate(VmStateReader template, IEnumerable<KeyValuePair<string, string>> ramFiles,
        string? scratchDirectory = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(template);
        ArgumentNullException.ThrowIfNull(ramFiles);
        var replacements = new List<(string Id, string Path)>();
        foreach (var (id, path) in ramFiles)
        {
            CheckBlockId(id);
            if (replacements.Any(r => r.Id == id)) throw new MigrationStreamException($"RAM block '{id}' is given more than once");
            RamFileLength(id, path);
            replacements.Add((id, Path.GetFullPath(path)));
        }

        string scratch = Path.Combine(scratchDirectory ?? Path.GetTempPath(), $"vmsnap-template-{Guid.NewGuid():N}");
        Directory.CreateDirectory(scratch);
        try
        {
            var sink = new TemplateSink(replacements, scratch);
            ConfigurationRecord? configuration = null;
            RamStartRecord? ram = null;
            var early = new List<byte[]>();
            bool switchover = false;
            var deviceState = new List<MigrationRecord>();
            try
            {
                foreach (MigrationRecord record in MigrationStream.Records(new MigrationRecordReader(template), new MigrationStreamSummary(), null, cancellationToken))
                {
                    RamSinkRecords.Write(sink, record);
                    switch (record)
                    {
                        case ConfigurationRecord c: configuration = c; break;
                        case RamStartRecord start: ram = start; break;
                        case DeviceSectionRecord { Kind: MigrationSectionKind.EarlySetup } section: early.Add(section.Bytes.ToArray()); break;
                        case CommandRecord: switchover = true; break;
                        case DeviceSectionRecord or UnwalkedDeviceStateRecord or EofRecord or VmDescriptionRecord: deviceState.Add(record); break;
                    }
                }
                sink.Complete();
            }
            finally
            {
                sink.Dispose();
            }
            return new MachineProfile(configuration?.MachineType, configuration?.PlainSubsections ?? [], ram!.SectionId, ram.Instance,
                [.. ram.Blocks], sink.Sources, PlainDeviceState(configuration, deviceState), scratch, early, switchover);
        }
        catch
        {
            DeleteScratch(scratch);
            throw;
        }
    }

    /// <summary>The device state as a plain stream carries it (a mapped-ram source's VM description without the capability).</summary>
    private static byte[] PlainDeviceState(ConfigurationRecord? configuration, List<MigrationRecord> deviceState)
    {
        using var memory = new MemoryStream();
        long start = 0;
        using (var backend = VmStateBackend.ForStream(memory, leaveOpen: true))
        using (var writer = new VmStateWriter(backend))
        {
            var plain = new MigrationRecordWriter(writer, MigrationStreamFormat.Plain);
            if (configuration is not null) plain.Write(configuration);   // says which source the description comes from
            start = writer.Tell();
            foreach (MigrationRecord record in deviceState) plain.Write(record);
            writer.Close();
        }
        return memory.ToArray()[(int)start..];
    }

    /// <summary>Deletes the scratch files of a template profile.</summary>
    public void Dispose()
    {
        if (_scratchDirectory is not null) DeleteScratch(_scratchDirectory);
    }

    private static void DeleteScratch(string directory)
    {
        try { Directory.Delete(directory, recursive: true); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }

    private static void CheckMachineType(string machineType)
    {
        if (string.IsNullOrEmpty(machineType)) throw new MigrationStreamException("the machine type is empty");
        if (Encoding.UTF8.GetByteCount(machineType) > 256)
            throw new MigrationStreamException($"machine type '{machineType}' is longer than 256 bytes");
    }

    private static void CheckBlockId(string id)
    {
        if (string.IsNullOrEmpty(id)) throw new MigrationStreamException("a RAM block id is empty");
        if (Encoding.UTF8.GetByteCount(id) > MigrationFormat.MaxIdLength)
            throw new MigrationStreamException($"RAM block id '{id}' is longer than {MigrationFormat.MaxIdLength} bytes");
    }

    private static long RamFileLength(string id, string path)
    {
        if (string.IsNullOrEmpty(path)) throw new MigrationStreamException($"RAM block '{id}' has an empty file name");
        var info = new FileInfo(path);
        if (!info.Exists) throw new MigrationStreamException($"RAM file '{path}' for block '{id}' does not exist");
        return info.Length;
    }

    /// <summary>First pass over a template: checks the replacement files against its block list and cuts the other blocks into scratch files.</summary>
    private sealed class TemplateSink(List<(string Id, string Path)> replacements, string scratch) : IRamSink, IDisposable
    {
        private RamFileSink? _inner;

        public string[] Sources { get; private set; } = [];

        public void BeginBlocks(IReadOnlyList<RamBlockInfo> blocks)
        {
            foreach (var (id, path) in replacements)
            {
                RamBlockInfo? block = blocks.FirstOrDefault(b => b.Id == id);
                if (block is null)
                    throw new MigrationStreamException(
                        $"RAM block '{id}' (given with file '{path}') is not in the template; its RAM blocks are: " +
                        string.Join(", ", blocks.Select(b => $"'{b.Id}' ({b.Length} bytes)")));
                long length = new FileInfo(path).Length;
                if (length != block.Length)
                    throw new MigrationStreamException(
                        $"RAM file '{path}' is {length} bytes but the template's block '{id}' is {block.Length} bytes; the file must have the block's exact length");
            }
            Sources = new string[blocks.Count];
            var cut = new List<KeyValuePair<string, string>>();
            for (int i = 0; i < blocks.Count; i++)
            {
                int r = replacements.FindIndex(x => x.Id == blocks[i].Id);
                Sources[i] = r >= 0 ? replacements[r].Path : Path.Combine(scratch, $"block{i}.ram");
                if (r < 0) cut.Add(new(blocks[i].Id, Sources[i]));
            }
            _inner = new RamFileSink(cut) { SyncOnComplete = false };
            _inner.BeginBlocks(blocks);
        }

        public void WritePages(int block, long offset, ReadOnlySpan<byte> pages) => _inner!.WritePages(block, offset, pages);

        public void WriteZeroPages(int block, long offset, long length) => _inner!.WriteZeroPages(block, offset, length);

        public void Complete() => _inner!.Complete();

        public void Dispose() => _inner?.Dispose();
    }
}
